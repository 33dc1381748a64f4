"""The jitted train and eval steps, and a train state that is born sharded.

One optimizer step = a ``lax.scan`` over the global batch's micro-batches, each
micro-batch's *summed* NLL divided by the supervised-token count of the whole global
batch, gradients summed; then clip + AdamW. So 1 x 4B rows and 4 x B rows give the same
gradient, whatever each micro-batch's share of supervised tokens.

A step whose loss or gradient is not finite is skipped on device: parameters and
optimizer state (hence the lr schedule) stay as they were, the skip is counted, and a
sticky ``nonfinite_tripped`` flag goes up once ``max_nonfinite_steps`` skips happen in a
row. The host looks at it when it reads metrics (every ``log_every`` steps) and before
every checkpoint, so no step waits on the host.
"""

from __future__ import annotations

import functools
from typing import Any, Callable

import flax.linen as nn
import flax.struct
import jax
import jax.numpy as jnp
import optax

from sft_jax import sharding as shd
from sft_jax.model import GPT2, GPT2Config, param_shapes, token_nll
from sft_jax.optim import applied_steps, global_norm

# Incremented each time a step function is traced (Python runs only while tracing), so
# tests can prove a whole run compiles once (or once per bucket length).
TRACE_COUNTS = {"train": 0, "eval": 0}

BATCH_KEYS = ("tokens", "targets", "weights", "positions", "segment_ids")


@flax.struct.dataclass
class TrainState:
    params: Any  # {"params": {...}} float32 master weights
    opt_state: Any  # optax state; Adam moments sharded like their parameters
    nonfinite_total: jax.Array  # int32: steps skipped for non-finite loss or gradient
    nonfinite_run: jax.Array  # int32: consecutive skips up to now
    nonfinite_tripped: jax.Array  # bool: nonfinite_run reached max_nonfinite_steps at some step


def state_shardings(model_cfg: GPT2Config, tx: optax.GradientTransformation, mesh) -> tuple[TrainState, TrainState]:
    """(abstract state with shardings, shardings) for ``model_cfg`` on ``mesh``; allocates nothing."""
    boxed = param_shapes(model_cfg)
    param_sh = shd.logical_shardings(mesh, boxed)
    abstract_params = nn.unbox(boxed)
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


def init_state(model_cfg: GPT2Config, tx, mesh, shardings: TrainState, *, seed: int = 0, params=None) -> TrainState:
    """A train state created directly in its shards: parameters from ``seed`` (HF's init)
    unless ``params`` (already sharded, e.g. from ``load_hf``) are given."""
    model = GPT2(model_cfg)

    def make(key, params):
        if params is None:
            dummy = jnp.zeros((1, 1), jnp.int32)
            params = nn.unbox(model.init(key, dummy, dummy, dummy + 1))
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


def summed_nll(model: GPT2, params, batch: dict, loss_chunk: int) -> jax.Array:
    """sum over positions of weight * NLL, in float32."""
    hidden = model.apply(params, batch["tokens"], batch["positions"], batch["segment_ids"], return_hidden=True)
    nll = token_nll(params["params"]["wte"], hidden, batch["targets"], model.config, chunk=loss_chunk)  # (B,T)
    return jnp.sum(nll * batch["weights"].astype(jnp.float32))


def split_micro(x: jax.Array, n_micro: int) -> jax.Array:
    """(G, ...) -> (n_micro, G/n_micro, ...). Micro-batch j takes rows j, j+n, j+2n, ...,
    so each micro-batch keeps rows on every data-parallel device (rows are laid out
    contiguously per device); the gradient does not depend on the partition."""
    g = x.shape[0]
    x = x.reshape((g // n_micro, n_micro) + x.shape[1:])
    return jnp.swapaxes(x, 0, 1)


def accumulated_grads(model: GPT2, params, batch: dict, n_micro: int, loss_chunk: int = 0, micro_sharding=None):
    """(loss, grads) of the global batch: scan over ``n_micro`` micro-batches, each one's
    summed NLL divided by the supervised-token count of the *whole* batch, summed."""
    denom = jnp.maximum(jnp.sum(batch["weights"].astype(jnp.float32)), 1.0)
    micro = {k: split_micro(batch[k], n_micro) for k in BATCH_KEYS}  # each (n_micro, G/n_micro, T)
    if micro_sharding is not None:
        micro = jax.lax.with_sharding_constraint(micro, {k: micro_sharding for k in BATCH_KEYS})

    def accumulate(grad_sum, mb):
        loss, grads = jax.value_and_grad(lambda p: summed_nll(model, p, mb, loss_chunk) / denom)(params)
        return jax.tree.map(jnp.add, grad_sum, grads), loss

    zeros = jax.tree.map(jnp.zeros_like, params)
    grads, losses = jax.lax.scan(accumulate, zeros, micro)
    return jnp.sum(losses), grads


def make_train_step(model_cfg: GPT2Config, tx: optax.GradientTransformation, schedule: optax.Schedule, *,
                    mesh, shardings: TrainState, n_micro: int = 1, loss_chunk: int = 0,
                    max_nonfinite_steps: int = 10, clip_norm: float = 0.0) -> Callable:
    """``step(state, batch) -> (state, metrics)``, jitted with the state donated.

    ``batch``: dict of global (G, T) arrays sharded over data x fsdp. ``metrics`` are
    device scalars; nothing in here waits on the host."""
    model = GPT2(model_cfg)
    batch_sh = shd.batch_sharding(mesh)
    micro_sh = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec(None, *shd.BATCH_SPEC))

    def step(state: TrainState, batch: dict):
        TRACE_COUNTS["train"] += 1
        loss, grads = accumulated_grads(model, state.params, batch, n_micro, loss_chunk, micro_sh)
        grads = jax.lax.with_sharding_constraint(grads, shardings.params)
        n_supervised = jnp.sum(batch["weights"].astype(jnp.float32))
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
            "supervised_tokens": n_supervised,
            "tokens": jnp.sum(batch["segment_ids"] > 0),
            "grad_norm": grad_norm,
            "clip_ratio": clip_ratio,
            "lr": lr,
            "nonfinite": ~finite,
            "nonfinite_total": new_state.nonfinite_total,
            "nonfinite_run": run,
            "nonfinite_tripped": new_state.nonfinite_tripped,
        }
        return new_state, metrics

    rep = shd.replicated(mesh)
    jitted = jax.jit(step, in_shardings=(shardings, batch_sh), out_shardings=(shardings, rep), donate_argnums=0)

    @functools.wraps(step)
    def run_step(state, batch):
        with shd.rules_context(mesh):
            return jitted(state, batch)

    run_step.jitted = jitted
    return run_step


def make_eval_step(model_cfg: GPT2Config, *, mesh, shardings: TrainState, loss_chunk: int = 0) -> Callable:
    """``eval_step(params, batch) -> (summed NLL, supervised tokens)`` as device scalars."""
    model = GPT2(model_cfg)

    def step(params, batch):
        TRACE_COUNTS["eval"] += 1
        return summed_nll(model, params, batch, loss_chunk), jnp.sum(batch["weights"].astype(jnp.float32))

    rep = shd.replicated(mesh)
    jitted = jax.jit(step, in_shardings=(shardings.params, shd.batch_sharding(mesh)), out_shardings=(rep, rep))

    def run_step(params, batch):
        with shd.rules_context(mesh):
            return jitted(params, batch)

    return run_step
