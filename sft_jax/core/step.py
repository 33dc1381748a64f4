"""The jitted train and eval steps of any objective, and a train state born sharded.

One optimizer step = a ``lax.scan`` over the global batch's micro-batches: each
micro-batch's *summed* loss (the objective's ``loss``) divided by the objective's
``normalizer`` of the whole global batch (SFT: supervised tokens; preference objectives:
pairs), gradients summed; then clip + AdamW. So 1 x 4B rows and 4 x B rows give the same
gradient, whatever each micro-batch's share of the normaliser.

A step whose loss or gradient is not finite is skipped on device: parameters and
optimizer state (hence the lr schedule) stay as they were, the skip is counted, and a
sticky ``nonfinite_tripped`` flag goes up once ``max_nonfinite_steps`` skips happen in a
row. The host looks at it when it reads metrics (every ``log_every`` steps) and before
every checkpoint, so no step waits on the host.

Frozen parameters (e.g. DPO's reference model) are a separate argument of the step: they
live on the mesh in their own shardings, get no gradient and no optimizer state, and are
never donated, so they are bit-equal after any number of steps.
"""

from __future__ import annotations

import functools
from typing import Any, Callable, Mapping

import flax.linen as nn
import flax.struct
import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import NamedSharding, PartitionSpec as P

from sft_jax.core import mesh as shd
from sft_jax.core.optimizer import applied_steps, global_norm

# Incremented each time a step function is traced (Python runs only while tracing), so
# tests can prove a whole run compiles once (or once per bucket length).
TRACE_COUNTS = {"train": 0, "eval": 0}


@flax.struct.dataclass
class TrainState:
    params: Any  # {"params": {...}} float32 master weights
    opt_state: Any  # optax state; Adam moments sharded like their parameters
    nonfinite_total: jax.Array  # int32: steps skipped for non-finite loss or gradient
    nonfinite_run: jax.Array  # int32: consecutive skips up to now
    nonfinite_tripped: jax.Array  # bool: nonfinite_run reached max_nonfinite_steps at some step


def state_shardings(boxed_params, tx: optax.GradientTransformation, mesh) -> tuple[TrainState, TrainState]:
    """(abstract state with shardings, shardings) for parameters shaped like the flax-boxed
    (logically named) abstract tree ``boxed_params`` on ``mesh``; allocates nothing."""
    param_sh = shd.logical_shardings(mesh, boxed_params)
    abstract_params = nn.unbox(boxed_params)
    abstract_opt = jax.eval_shape(tx.init, abstract_params)
    # Adam's moments get their parameter's sharding; counters and other scalars replicate.
    opt_sh = optax.tree_map_params(tx, lambda _, s: s, abstract_opt, param_sh,
                                   transform_non_params=lambda _: shd.replicated(mesh))
    rep = shd.replicated(mesh)
    shardings = TrainState(params=param_sh, opt_state=opt_sh, nonfinite_total=rep, nonfinite_run=rep,
                           nonfinite_tripped=rep)
    scalar = jax.ShapeDtypeStruct((), jnp.int32)
    abstract = TrainState(params=abstract_params, opt_state=abstract_opt, nonfinite_total=scalar,
                          nonfinite_run=scalar, nonfinite_tripped=jax.ShapeDtypeStruct((), jnp.bool_))
    abstract = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract, shardings)
    return abstract, shardings


def _fresh_counters():
    return dict(nonfinite_total=jnp.zeros((), jnp.int32), nonfinite_run=jnp.zeros((), jnp.int32),
                nonfinite_tripped=jnp.zeros((), jnp.bool_))


def init_state(init_params: Callable, tx, shardings: TrainState, *, seed: int = 0, params=None) -> TrainState:
    """A train state created directly in its shards: parameters from ``init_params(key)``
    (traced under jit, so nothing full-size sits on one device) unless ``params`` are given."""

    def make(key, params):
        if params is None:
            params = init_params(key)
        return TrainState(params=params, opt_state=tx.init(params), **_fresh_counters())

    key = jax.random.key(seed)
    if params is None:
        return jax.jit(lambda k: make(k, None), out_shardings=shardings)(key)
    params = jax.device_put(params, shardings.params)
    return jax.jit(lambda p: make(None, p), out_shardings=shardings, donate_argnums=0)(params)


def state_from_restored(params, opt_state, train_state: dict | None, shardings: TrainState) -> TrainState:
    counters = dict(train_state or {})
    rep = shardings.nonfinite_total
    put = lambda v, dt: jax.device_put(jnp.asarray(v, dt), rep)
    return TrainState(params=params, opt_state=opt_state,
                      nonfinite_total=put(counters.get("nonfinite_total", 0), jnp.int32),
                      nonfinite_run=put(counters.get("nonfinite_run", 0), jnp.int32),
                      nonfinite_tripped=put(False, jnp.bool_))


def batch_shardings(mesh, batch_axes: Mapping[str, tuple[str, ...]]) -> dict[str, NamedSharding]:
    """Each batch array's NamedSharding from its logical axis names (the rules table of
    ``sft_jax.core.mesh``): ("batch", "length") puts rows over data x fsdp."""

    def spec(axes) -> P:
        entries = list(nn.logical_to_mesh_axes(tuple(axes), shd.LOGICAL_RULES))
        while entries and entries[-1] is None:  # P(x) and P(x, None) are different cache keys
            entries.pop()
        return P(*entries)

    return {k: NamedSharding(mesh, spec(axes)) for k, axes in batch_axes.items()}


def global_batch(batch: Mapping, shardings: Mapping[str, NamedSharding], global_rows: int) -> dict[str, jax.Array]:
    """Global device arrays of the declared keys from this process's numpy slice of the
    batch (its rows of each array)."""
    put = lambda x, s: jax.make_array_from_process_local_data(s, x, (global_rows,) + x.shape[1:])
    return {k: put(np.asarray(batch[k]), s) for k, s in shardings.items()}


def split_micro(x: jax.Array, n_micro: int) -> jax.Array:
    """(G, ...) -> (n_micro, G/n_micro, ...). Micro-batch j takes rows j, j+n, j+2n, ...,
    so each micro-batch keeps rows on every data-parallel device (rows are laid out
    contiguously per device); the gradient does not depend on the partition."""
    g = x.shape[0]
    x = x.reshape((g // n_micro, n_micro) + x.shape[1:])
    return jnp.swapaxes(x, 0, 1)


def accumulated_grads(objective, params, frozen, batch: dict, n_micro: int, micro_shardings=None):
    """(loss, grads, aux) of the global batch: scan over ``n_micro`` micro-batches, each
    one's summed loss (and summed aux metrics) divided by ``objective.normalizer`` of the
    *whole* batch, summed."""
    denom = objective.normalizer(batch)
    micro = {k: split_micro(batch[k], n_micro) for k in objective.batch_axes}  # each (n_micro, G/n_micro, ...)
    if micro_shardings is not None:
        micro = jax.lax.with_sharding_constraint(micro, micro_shardings)

    def normalised(p, mb):
        total, aux = objective.loss(p, frozen, mb)
        return total / denom, jax.tree.map(lambda a: a / denom, aux)

    def accumulate(grad_sum, mb):
        (loss, aux), grads = jax.value_and_grad(normalised, has_aux=True)(params, mb)
        return jax.tree.map(jnp.add, grad_sum, grads), (loss, aux)

    zeros = jax.tree.map(jnp.zeros_like, params)
    grads, (losses, aux) = jax.lax.scan(accumulate, zeros, micro)
    return jnp.sum(losses), grads, jax.tree.map(lambda a: jnp.sum(a, axis=0), aux)


def _micro_shardings(mesh, batch_sh: Mapping[str, NamedSharding]) -> dict[str, NamedSharding]:
    return {k: NamedSharding(mesh, P(None, *s.spec)) for k, s in batch_sh.items()}


def make_train_step(objective, tx: optax.GradientTransformation, schedule: optax.Schedule, *, mesh,
                    shardings: TrainState, n_micro: int = 1, max_nonfinite_steps: int = 10,
                    clip_norm: float = 0.0, frozen_shardings=None) -> Callable:
    """``step(state, batch, frozen=None) -> (state, metrics)``, jitted with the state donated.

    ``objective`` gives ``batch_axes``, ``loss``, ``normalizer`` and ``batch_metrics``
    (see ``sft_jax.objectives.base.Loss``). ``batch``: dict of global arrays sharded as
    ``batch_axes`` says. ``metrics`` are device scalars; nothing in here waits on the host."""
    batch_sh = batch_shardings(mesh, objective.batch_axes)
    micro_sh = _micro_shardings(mesh, batch_sh)

    def step(state: TrainState, batch: dict, frozen):
        TRACE_COUNTS["train"] += 1
        loss, grads, aux = accumulated_grads(objective, state.params, frozen, batch, n_micro, micro_sh)
        grads = jax.lax.with_sharding_constraint(grads, shardings.params)
        grad_norm = global_norm(grads)
        finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)

        lr = schedule(applied_steps(state.opt_state))
        updates, new_opt_state = tx.update(grads, state.opt_state, state.params)
        new_params = optax.apply_updates(state.params, updates)
        keep_new = lambda new, old: jax.tree.map(lambda a, b: jnp.where(finite, a, b), new, old)
        run = jnp.where(finite, 0, state.nonfinite_run + 1)
        new_state = TrainState(
            params=keep_new(new_params, state.params),
            opt_state=keep_new(new_opt_state, state.opt_state),
            nonfinite_total=state.nonfinite_total + (~finite).astype(jnp.int32),
            nonfinite_run=run,
            nonfinite_tripped=state.nonfinite_tripped | (run >= max_nonfinite_steps),
        )
        clip_ratio = jnp.minimum(1.0, clip_norm / grad_norm) if clip_norm > 0 else jnp.ones(())
        metrics = {
            "loss": loss,
            **objective.batch_metrics(batch),
            "grad_norm": grad_norm,
            "clip_ratio": clip_ratio,
            "lr": lr,
            "nonfinite": ~finite,
            "nonfinite_total": new_state.nonfinite_total,
            "nonfinite_run": run,
            "nonfinite_tripped": new_state.nonfinite_tripped,
            **aux,
        }
        return new_state, metrics

    rep = shd.replicated(mesh)
    jitted = jax.jit(step, in_shardings=(shardings, batch_sh, frozen_shardings), out_shardings=(shardings, rep),
                     donate_argnums=0)

    @functools.wraps(step)
    def run_step(state, batch, frozen=None):
        with shd.rules_context(mesh):
            return jitted(state, batch, frozen)

    run_step.jitted = lambda state, batch, frozen=None: jitted(state, batch, frozen)
    run_step.batch_shardings = batch_sh
    return run_step


def make_eval_step(objective, *, mesh, param_shardings, frozen_shardings=None) -> Callable:
    """``eval_step(params, batch, frozen=None) -> objective.eval_sums(...)`` as replicated
    device arrays (sums the caller adds up over batches)."""

    def step(params, batch, frozen):
        TRACE_COUNTS["eval"] += 1
        return objective.eval_sums(params, frozen, batch)

    rep = shd.replicated(mesh)
    batch_sh = batch_shardings(mesh, objective.batch_axes)
    jitted = jax.jit(step, in_shardings=(param_shardings, batch_sh, frozen_shardings), out_shardings=rep)

    def run_step(params, batch, frozen=None):
        with shd.rules_context(mesh):
            return jitted(params, batch, frozen)

    run_step.batch_shardings = batch_sh
    return run_step
