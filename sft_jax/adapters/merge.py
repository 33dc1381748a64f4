"""LoRA adapters merged into their base model: a plain transformers checkpoint.

The adapters come from a LoRA run's checkpoint (its root, newest step, or a step dir) or from a
PEFT adapter directory. The base is ``base`` when given, else the one the checkpoint names
(checked against the sha256 of its weight files the run recorded) or the adapter config's
``base_model_name_or_path``. The merged model ``W + s Aᵀ Bᵀ`` is written by the HF export,
which reloads and checks it, and compared with peft's logits of base + adapter when torch and
peft are importable.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import flax.linen as nn
import jax
import jax.numpy as jnp

from sft_jax.adapters import lora
from sft_jax.adapters.objective import base_fingerprint, verify_peft
from sft_jax.core import checkpoint
from sft_jax.models import hf_io as hf


def _from_checkpoint(src: str, base: str | None):
    """(base dir, spec, adapters, tokenizer) of a LoRA run's checkpoint."""
    restored = checkpoint.restore(src)
    train_state = restored["train_state"] or {}
    identity, conf = train_state.get("lora_base"), train_state.get("lora_adapter")
    if identity is None:
        raise lora.AdapterError(f"{src} holds a full model, not LoRA adapters: convert it with orbax-to-hf")
    if conf is None:
        raise lora.AdapterError(f"{src} does not record its adapters' rank, alpha and targets; merge the run's "
                                f"exported adapter directory (OUTPUT_DIR/adapter) instead")
    if identity["path"].startswith("scratch:"):
        raise lora.AdapterError(f"{src} holds adapters on a randomly initialised base ({identity['path']}, "
                                f"{identity['sha256']}), which no model directory holds")
    base = base or identity["path"]
    digest = base_fingerprint(hf.resolve_dir(base))
    if digest != identity["sha256"]:
        raise lora.AdapterError(f"{src} holds adapters for base {identity['path']} (sha256 {identity['sha256']}); "
                                f"{base} has sha256 {digest}")
    cfg = restored["model_config"]
    spec = lora.resolve(cfg, int(conf["r"]), float(conf["lora_alpha"]), bool(conf["use_rslora"]),
                        tuple(conf["target_modules"]))
    adapters = restored["params"]
    want = jax.tree.map(lambda x: x.shape, nn.unbox(lora.abstract_adapters(cfg, spec)))
    if jax.tree.map(lambda x: x.shape, adapters) != want:
        raise lora.AdapterError(f"{src}: the adapters' shapes do not match rank {spec.rank} on "
                                f"{', '.join(spec.modules)} of this model")
    return base, spec, adapters, restored["tokenizer"]


def merge_to_hf(src: str, dst: str, *, base: str | None = None, dtype: str = "float32",
                overwrite: bool = False) -> tuple[hf.ExportReport, str]:
    """Write base + the adapters of ``src`` merged to ``dst``; (the export's report, peft's check
    or '' when peft is not importable). AdapterError, HFFormatError, CheckpointError: user errors."""
    adapter_dir = Path(src) if (Path(src) / lora.CONFIG_FILE).is_file() else None
    if adapter_dir is not None:
        base = base or lora.read_adapter_config(adapter_dir).get("base_model_name_or_path")
        if not base:
            raise lora.AdapterError(f"{src}: its {lora.CONFIG_FILE} names no base model; pass --base")
        tokenizer = None
    else:
        base, spec, adapters, tokenizer = _from_checkpoint(src, base)
    cfg, params = hf.load_hf(base, dtype="float32")
    if adapter_dir is not None:
        spec, adapters = lora.load_peft(adapter_dir, cfg)
    if tokenizer is None:
        tokenizer = hf.load_tokenizer(base)
    merged = jax.jit(lambda p, a: lora.merge(p, a, spec))(params, jax.tree.map(jnp.asarray, adapters))
    with tempfile.TemporaryDirectory() as tmp:
        if adapter_dir is None:  # peft reads the adapters from its own format
            adapter_dir = lora.save_peft(Path(tmp) / "adapter", cfg, spec, adapters, base=str(base))
        checked = verify_peft(adapter_dir, hf.resolve_dir(base), cfg, merged)
    report = hf.export_hf(merged, cfg, dst, tokenizer=tokenizer, dtype=dtype, overwrite=overwrite)
    return report, checked
