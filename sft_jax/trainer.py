"""Supervised fine-tuning as ``python -m sft_jax.train`` runs it: the shared training core
(``sft_jax.core.loop.run``) with the SFT objective (``sft_jax.objectives.sft``).

Where the pieces of the former single-file trainer now live:

- validate, build, restore, run directory, SIGTERM: ``sft_jax.core.loop.run`` /
  ``sigterm_flag``; compilation cache, run directories, resume source, model and
  tokenizer: ``sft_jax.core.setup``;
- the loop (train, log, check_finite, save, evaluate, host_params, final_outputs):
  ``sft_jax.core.loop.Loop``;
- SFT's data, held-out loss, samples and exact match (generation_eval, generate) and
  its HF causal-LM export: ``sft_jax.objectives.sft.SFTObjective``.

The names below stay importable from here for callers of the former module.
"""

from __future__ import annotations

from typing import Callable

from sft_jax.config import Config
from sft_jax.core import loop as core_loop
from sft_jax.core.loop import TEST_KILL_ENV, Loop, NonFiniteError, RunResult
from sft_jax.core.loop import sigterm_flag as _sigterm_flag
from sft_jax.core.setup import (ARCH_FIELDS, download_outputs, enable_compilation_cache, model_and_tokenizer,
                                resume_source, run_dirs, upload_outputs)
from sft_jax.core.setup import checkpoint_model_config as _checkpoint_model_config
from sft_jax.core.metrics import device_memory
from sft_jax.core.loop import batch_size_changes
from sft_jax.objectives.sft import GENERATE_BATCH, SFTObjective, _last_response, generation_examples

_Loop = Loop

__all__ = ["ARCH_FIELDS", "GENERATE_BATCH", "TEST_KILL_ENV", "NonFiniteError", "RunResult", "download_outputs",
           "enable_compilation_cache", "model_and_tokenizer", "resume_source", "run", "run_dirs", "upload_outputs"]


def run(config: Config, *, devices=None, batch_transform: Callable | None = None) -> RunResult:
    """Fine-tune as ``config`` says. ``devices`` restricts the mesh (default: all);
    ``batch_transform(step, numpy_batch) -> numpy_batch`` is a test hook (e.g. a NaN)."""
    # device_memory is looked up here at each log, so it can be replaced on this module
    # (CPU keeps no allocator statistics; tests give it some).
    return core_loop.run(config, SFTObjective, devices=devices, batch_transform=batch_transform,
                     memory_stats=lambda: device_memory())
