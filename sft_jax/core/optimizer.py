"""The optimizer: clip by global norm, then AdamW on a linear-warmup + cosine schedule.

    g <- g / max(1, ||g|| / c)                       (optax.clip_by_global_norm)
    lr(s) = lr * s / warmup                  for s < warmup
          = cosine from lr to lr * final_lr_fraction over the remaining steps
    p <- p - lr(s) * (adam(g) + wd * p * mask)       (optax.adamw, decoupled decay)

``s`` counts *applied* updates: a skipped non-finite step leaves the optimizer state, and
so the schedule, where it was. Weight decay touches matmul kernels only; biases,
norms and the embedding tables (each family's ``embedding_names``) are exempt unless
``optim.decay_embeddings``.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax

from sft_jax.config import OptimSection
from sft_jax.models.family import embedding_names


def lr_schedule(optim: OptimSection, total_steps: int) -> optax.Schedule:
    warmup = min(optim.warmup_steps, max(total_steps - 1, 0))
    return optax.warmup_cosine_decay_schedule(
        init_value=0.0, peak_value=optim.lr, warmup_steps=warmup,
        decay_steps=max(total_steps, warmup + 1), end_value=optim.lr * optim.final_lr_fraction)


def decay_mask(params, decay_embeddings: bool = False):
    """True where weight decay applies: ``*_kernel`` matrices, plus the embedding tables if asked."""
    embeddings = embedding_names() if decay_embeddings else frozenset()

    def decays(path, _):
        name = path[-1].key if hasattr(path[-1], "key") else str(path[-1])
        return name.endswith("_kernel") or name in embeddings

    return jax.tree_util.tree_map_with_path(decays, params)


def make_optimizer(optim: OptimSection, total_steps: int) -> tuple[optax.GradientTransformation, optax.Schedule]:
    schedule = lr_schedule(optim, total_steps)
    adamw = optax.adamw(schedule, b1=optim.b1, b2=optim.b2, eps=optim.eps, weight_decay=optim.weight_decay,
                        mask=lambda p: decay_mask(p, optim.decay_embeddings))
    clip = optax.clip_by_global_norm(optim.clip_norm) if optim.clip_norm > 0 else optax.identity()
    return optax.chain(clip, adamw), schedule


def applied_steps(opt_state) -> jax.Array:
    """How many updates the optimizer has applied (the schedule's position)."""
    (count,) = [v for path, v in optax.tree_utils.tree_get_all_with_path(opt_state, "count")
                if getattr(path[-1], "tuple_name", None) == "ScaleByScheduleState"]
    return count


def global_norm(tree) -> jax.Array:
    return optax.tree.norm(tree).astype(jnp.float32)
