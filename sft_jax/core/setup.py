"""Run setup shared by every objective: the compilation cache, where a run's files go,
what to resume from, and the model and tokenizer a config names (read without weights)."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Optional

import jax

from sft_jax.core import checkpoint as ckpt
from sft_jax.config import Config, ConfigError
from sft_jax.data import chat_template, resolve_template, turn_end_token_id
from sft_jax.models.family import DEFAULT_MODEL_TYPE, ModelConfig, config_for_preset, family_of, with_stop_token_ids
from sft_jax.runtime.paths import as_path, run_dirs


def enable_compilation_cache(directory: Optional[str]) -> None:
    """Persistent XLA cache, so a rerun or resume skips compilation; thresholds lowered so
    small CPU programs are cached too."""
    if directory and jax.default_backend() == "cpu" and jax.device_count() > 1:
        # XLA:CPU (jax 0.10) deadlocks in cross-device collectives of executables loaded from
        # the persistent cache (seen: a resume on a data=4 x fsdp=2 mesh of host devices
        # hangs in its first step). Several CPU devices only exist in tests and trials.
        print("sft_jax: persistent compilation cache off: several CPU devices", file=sys.stderr, flush=True)
        directory = None
    if not directory:
        jax.config.update("jax_enable_compilation_cache", False)
        return
    from jax.experimental.compilation_cache import compilation_cache

    path = os.path.abspath(os.path.expanduser(directory))
    os.makedirs(path, exist_ok=True)
    if jax.config.jax_compilation_cache_dir != path:  # jax opens the cache once per process
        jax.config.update("jax_compilation_cache_dir", path)
        compilation_cache.reset_cache()
    jax.config.update("jax_enable_compilation_cache", True)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)


def resume_source(config: Config):
    """The checkpoint root to resume from, or None for a fresh start."""
    resume = config.train.resume
    own = run_dirs(config)[1]
    if resume == "never":
        return None
    if resume == "auto":
        return own if ckpt.latest_step(own) is not None else None
    path = as_path(resume)
    for candidate in (path / "checkpoints", path):
        if ckpt.is_checkpoint(candidate):
            return candidate
    raise ConfigError(f"train.resume={resume!r}: no complete sft_jax checkpoint there "
                      f"(use auto, never, or a checkpoints directory)")


def model_and_tokenizer(config: Config):
    """(model config, tokenizer, hf_dir or None), reading no weights: a preset of any family for
    ``model.init_from: scratch``, else the family ``config.json`` names. The tokenizer carries the
    chat template the run trains with, so every checkpoint (and the export) stores it."""
    m = config.model
    compute = dict(dtype=m.dtype, remat=m.remat, attention=m.attention, scan_layers=m.scan_layers,
                   max_segments_per_row=config.data.max_segments_per_row)
    if m.init_from == "scratch":
        tokenizer = _demo_tokenizer() if m.tokenizer in (None, "demo") else _load_tokenizer(m.tokenizer)
        cfg = config_for_preset(m.preset, vocab_size=len(tokenizer), max_position_embeddings=m.n_positions,
                                bos_token_id=tokenizer.eos_token_id, eos_token_id=tokenizer.eos_token_id, **compute)
        return _stop_at_turn_end(cfg, tokenizer, config), tokenizer, None
    from sft_jax.models import hf_io

    directory = hf_io.resolve_dir(m.init_from)
    cfg = hf_io.read_config(directory, **compute)
    tokenizer = _load_tokenizer(m.tokenizer or str(directory))
    return _stop_at_turn_end(cfg, tokenizer, config), tokenizer, directory


def _stop_at_turn_end(cfg: ModelConfig, tokenizer, config: Config) -> ModelConfig:
    """Put the chat template the run trains with on the tokenizer (``auto``: the tokenizer's own, if
    any), and make the token that closes its assistant turns one the model stops at."""
    data_cfg = resolve_template(config.data, tokenizer)
    tokenizer.chat_template = chat_template(data_cfg)
    turn_end = turn_end_token_id(tokenizer, None if data_cfg.template is None else tokenizer.chat_template)
    if turn_end == tokenizer.eos_token_id:  # every decoding path stops at the tokenizer's EOS already
        return cfg
    try:
        return with_stop_token_ids(cfg, [turn_end])
    except ValueError as e:
        raise ConfigError(f"data.template closes assistant turns with token id {turn_end}: {e}") from e


def _demo_tokenizer():
    """The demo's tokenizer (``model.tokenizer: demo``), a BPE trained on the built-in tasks;
    named, not imported, so the core does not depend on the demos."""
    import importlib

    return importlib.import_module("sft_jax.demos.tasks").demo_tokenizer(seed=0)


def _load_tokenizer(name: str):
    from sft_jax.models.tokenizer import load_tokenizer

    return load_tokenizer(name)


def checkpoint_model_config(root: Path, item: str = "model_config") -> dict:
    """The architecture stored with the newest checkpoint (read without touching weights);
    ``item="train_state"``: its train state (step, data position, what the objective added)."""
    step_dir = root / str(ckpt.latest_step(root))
    for f in sorted((step_dir / item).glob("*")):
        if f.is_file():
            try:
                return json.loads(f.read_text())
            except (ValueError, UnicodeDecodeError):
                continue
    return {}


def check_same_model(source: Path, model_cfg: ModelConfig) -> None:
    """A resume must find the architecture that model.* describes: its family and the fields
    that identify an architecture of it (``Family.arch_fields``)."""
    saved = checkpoint_model_config(source)
    if not saved:
        return
    saved_type = saved.get("model_type", DEFAULT_MODEL_TYPE)
    if saved_type != model_cfg.model_type:
        raise ConfigError(f"checkpoint {source} holds a {saved_type} model; model.* describes {model_cfg.model_type}")
    fields = family_of(model_cfg).arch_fields
    diff = {k: (saved.get(k), getattr(model_cfg, k)) for k in fields if saved.get(k) != getattr(model_cfg, k)}
    if diff:
        raise ConfigError(f"checkpoint {source} holds a different model than model.* describes: {diff}")
