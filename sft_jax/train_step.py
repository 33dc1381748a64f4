"""The SFT train and eval steps under their original names, for callers that build a step
without a run (``sft_jax.bench``, tests): the shared step of ``sft_jax.core.step`` with the
SFT loss of ``sft_jax.objectives.sft``. See ``core.step`` for accumulation and the
non-finite guard.
"""

from __future__ import annotations

from typing import Callable

import optax

from sft_jax.core import step as core
from sft_jax.core.step import TRACE_COUNTS, TrainState, split_micro, state_from_restored
from sft_jax.model import GPT2, GPT2Config, param_shapes
from sft_jax.objectives.sft import BATCH_KEYS, SFTLoss, init_params, summed_nll
from sft_jax.core.optimizer import global_norm  # noqa: F401  (callers of the former module use ts.global_norm)

__all__ = ["BATCH_KEYS", "TRACE_COUNTS", "TrainState", "accumulated_grads", "init_state", "make_eval_step",
           "make_train_step", "split_micro", "state_from_restored", "state_shardings", "summed_nll"]


def state_shardings(model_cfg: GPT2Config, tx: optax.GradientTransformation, mesh) -> tuple[TrainState, TrainState]:
    """(abstract state with shardings, shardings) for ``model_cfg`` on ``mesh``; allocates nothing."""
    return core.state_shardings(param_shapes(model_cfg), tx, mesh)


def init_state(model_cfg: GPT2Config, tx, mesh, shardings: TrainState, *, seed: int = 0, params=None) -> TrainState:
    """A train state created directly in its shards: parameters from ``seed`` (HF's init)
    unless ``params`` (already sharded, e.g. from ``load_hf``) are given."""
    return core.init_state(lambda key: init_params(model_cfg, key), tx, shardings, seed=seed, params=params)


def accumulated_grads(model: GPT2, params, batch: dict, n_micro: int, loss_chunk: int = 0, micro_sharding=None):
    """(loss, grads) of the global batch: scan over ``n_micro`` micro-batches, each one's
    summed NLL divided by the supervised-token count of the *whole* batch, summed."""
    micro = None if micro_sharding is None else {k: micro_sharding for k in BATCH_KEYS}
    loss, grads, _ = core.accumulated_grads(SFTLoss(model.config, loss_chunk), params, None, batch, n_micro, micro)
    return loss, grads


def make_train_step(model_cfg: GPT2Config, tx: optax.GradientTransformation, schedule: optax.Schedule, *,
                    mesh, shardings: TrainState, n_micro: int = 1, loss_chunk: int = 0,
                    max_nonfinite_steps: int = 10, clip_norm: float = 0.0) -> Callable:
    """``step(state, batch) -> (state, metrics)``, jitted with the state donated.

    ``batch``: dict of global (G, T) arrays sharded over data x fsdp. ``metrics`` are
    device scalars; nothing in here waits on the host."""
    return core.make_train_step(SFTLoss(model_cfg, loss_chunk), tx, schedule, mesh=mesh, shardings=shardings,
                                n_micro=n_micro, max_nonfinite_steps=max_nonfinite_steps, clip_norm=clip_norm)


def make_eval_step(model_cfg: GPT2Config, *, mesh, shardings: TrainState, loss_chunk: int = 0) -> Callable:
    """``eval_step(params, batch) -> (summed NLL, supervised tokens)`` as device scalars."""
    return core.make_eval_step(SFTLoss(model_cfg, loss_chunk), mesh=mesh, param_shardings=shardings.params)
