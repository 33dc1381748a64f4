"""Any objective with LoRA: the adapters are the trained parameters, the base model is frozen.

``wrap(config, objective)`` returns the objective itself when ``model.lora.rank`` is 0 and no
``model.adapter`` is given, else a ``LoraObjective`` around it. The wrapper hands the core the
adapters as the trained tree (float32, AdamW, the config's clip and schedule) and the base as a
frozen parameter in the compute dtype, so the core keeps no float32 master copy, gradient or
Adam state for it, and never checkpoints it. Every loss the inner objective computes sees the
merged tree ``W + s * A^T B^T``; its evaluation, generation and export see the merged model
through a view of the loop whose ``host_params`` merge.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from sft_jax.adapters import lora
from sft_jax.config import ConfigError
from sft_jax.core import mesh as shd
from sft_jax.objectives.base import Objective

VERIFY_ATOL = 1e-4  # peft (torch float32) vs JAX float32 logits at export


def enabled(config) -> bool:
    return config.model.lora.rank > 0 or config.model.adapter is not None


def wrap(config, objective):
    """``objective`` trained through LoRA adapters when the config asks for them."""
    if not enabled(config):
        return objective
    if not objective.supports_lora:
        raise ConfigError(f"model.lora and model.adapter apply to SFT and DPO; {type(objective).__name__} "
                          f"trains a head besides the language model, which adapters do not cover yet")
    lo, cfg = config.model.lora, objective.model_cfg
    try:
        if config.model.adapter is not None:
            spec, start = lora.load_peft(config.model.adapter, cfg)
            if lo.rank and lo.rank != spec.rank:
                raise lora.AdapterError(f"model.lora.rank={lo.rank} but model.adapter={config.model.adapter!r} "
                                        f"has rank {spec.rank}; leave model.lora.rank at 0 or make them agree")
        else:
            spec, start = lora.resolve(cfg, lo.rank, lo.alpha, lo.rslora, lo.targets), None
    except lora.AdapterError as e:
        raise ConfigError(str(e)) from None
    return LoraObjective(objective, spec, start)


class LoraObjective(Objective):
    def __init__(self, inner, spec: lora.LoraSpec, start=None):
        Objective.__init__(self, inner.config, inner.model_cfg, inner.tokenizer, inner.hf_dir)
        self.inner, self.spec, self.start = inner, spec, start
        self.batch_axes, self.metric_names = inner.batch_axes, inner.metric_names
        self._merge = jax.jit(lambda base, adapters: lora.merge(base, adapters, spec))

    # --- what the step traces -------------------------------------------------------------
    def inner_frozen(self, frozen):
        """The inner objective's frozen parameters: the base itself when they are the starting model."""
        base, inner = frozen
        return base if getattr(self.inner, "frozen_is_start", False) else inner

    def loss(self, params, frozen, batch):
        return self.inner.loss(lora.merge(frozen[0], params, self.spec), self.inner_frozen(frozen), batch)

    def normalizer(self, batch):
        return self.inner.normalizer(batch)

    def batch_metrics(self, batch):
        return self.inner.batch_metrics(batch)

    def eval_sums(self, params, frozen, batch):
        return self.inner.eval_sums(lora.merge(frozen[0], params, self.spec), self.inner_frozen(frozen), batch)

    # --- parameters -----------------------------------------------------------------------
    def abstract_params(self):
        return lora.abstract_adapters(self.model_cfg, self.spec)

    def init_params(self, key):
        return lora.init_adapters(self.model_cfg, self.spec, key)

    def initial_params(self, shardings):
        return None if self.start is None else jax.device_put(self.start, shardings)

    def frozen_params(self, mesh):
        """The base (the inner objective's starting parameters) in the compute dtype, plus the
        inner objective's own frozen parameters."""
        sh = shd.logical_shardings(mesh, self.inner.abstract_params())
        base = self.inner.initial_params(sh)
        dtype = jnp.dtype(self.model_cfg.dtype)
        cast = lambda tree: jax.tree.map(lambda x: x.astype(dtype), tree)
        with shd.rules_context(mesh):
            if base is None:
                key = jax.random.key(self.config.train.seed)
                base = jax.jit(lambda k: cast(self.inner.init_params(k)), out_shardings=sh)(key)
            else:
                base = jax.jit(cast, out_shardings=sh, donate_argnums=0)(base)
        inner = None if getattr(self.inner, "frozen_is_start", False) else self.inner.frozen_params(mesh)
        inner_params, inner_sh = inner if inner is not None else (None, None)
        return (base, inner_params), (sh, inner_sh)

    def optimizer(self, tx):
        return tx

    # --- checkpoints: adapters only, plus which base they belong to ----------------------------
    def base_identity(self) -> dict:
        if getattr(self, "_identity", None) is None:
            if self.hf_dir is None:
                m = self.config.model
                path, digest = f"scratch:{m.preset}", f"seed {self.config.train.seed}"
            else:
                path, digest = str(self.hf_dir), base_fingerprint(self.hf_dir)
            self._identity = {"path": path, "sha256": digest}
        return self._identity

    def checkpoint_state(self) -> dict:
        """The base's identity, and the adapters' rank, alpha and targets (PEFT's names) for merging."""
        return {"lora_base": self.base_identity(), "lora_adapter": lora.peft_config(self.model_cfg, self.spec, None)}

    def check_resume(self, source, train_state: dict) -> None:
        saved, mine = train_state.get("lora_base"), self.base_identity()
        if saved is None:
            raise ConfigError(f"checkpoint {source} holds a full model, not LoRA adapters; set model.lora.rank=0 "
                              f"or start a new run directory")
        if saved.get("sha256") != mine["sha256"]:
            raise ConfigError(f"checkpoint {source} holds adapters for base {saved.get('path')} "
                              f"(sha256 {saved.get('sha256')}); this run's base is {mine['path']} "
                              f"(sha256 {mine['sha256']})")

    # --- the rest is the inner objective's, on the merged model -----------------------------
    def build_data(self):
        return self.inner.build_data()

    def rollout(self, loop, step, batch):
        return self.inner.rollout(MergedView(loop, self), step, batch)

    def on_save(self, loop, step):
        self.inner.on_save(MergedView(loop, self), step)

    def evaluate(self, loop, step):
        return self.inner.evaluate(MergedView(loop, self), step)

    def merged(self, loop):
        return self._merge(loop.frozen[0], loop.host_params())

    def export(self, loop, out: Path) -> list[str]:
        """The PEFT adapter at ``out/adapter`` (verified in peft when torch and peft are
        importable), and with ``run.export_merged`` the merged model as the inner export."""
        lines = []
        adapter_dir = out / "adapter"
        adapters = loop.host_params()
        if jax.process_index() == 0:
            base = str(self.hf_dir) if self.hf_dir is not None else None
            lora.save_peft(adapter_dir, self.model_cfg, self.spec, adapters, base=base)
            checked = verify_peft(adapter_dir, self.hf_dir, self.model_cfg, self.merged(loop))
            lines.append(f"PEFT adapter: {adapter_dir}" + (f" ({checked})" if checked else ""))
        if self.config.run.export_merged:
            lines += self.inner.export(MergedView(loop, self), out)
        return lines


class MergedView:
    """The loop as the inner objective reads it: parameters are the merged model, frozen
    parameters are the inner objective's own."""

    def __init__(self, loop, objective: LoraObjective):
        self._loop, self._objective = loop, objective

    def __getattr__(self, name):
        return getattr(self._loop, name)

    @property
    def frozen(self):
        return self._objective.inner_frozen(self._loop.frozen)

    def host_params(self):
        return self._objective.merged(self._loop)


def verify_peft(adapter_dir: Path, base_dir, cfg, merged) -> str:
    """peft's logits of base + adapter against the JAX merged model's; '' when torch or peft
    is not importable or there is no base directory to load."""
    try:
        import torch
        from peft import PeftModel
        from transformers import AutoModelForCausalLM
    except ImportError:
        return ""
    if base_dir is None:
        return ""
    from sft_jax.models import hf_io

    cfg32 = cfg.replace(dtype="float32", remat="none")
    tokens = np.asarray(hf_io.verify_tokens(cfg32))
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(str(base_dir), torch_dtype=torch.float32),
                                      str(adapter_dir)).eval()
    with torch.no_grad():
        want = model(input_ids=torch.as_tensor(tokens, dtype=torch.long)).logits.float().numpy()
    got = np.asarray(hf_io.logits_of(cfg32, jax.device_get(merged), tokens))[..., :cfg.vocab_size]
    diff = float(np.max(np.abs(got - want)))
    if not diff <= VERIFY_ATOL:
        raise RuntimeError(f"exported adapter {adapter_dir}: peft's logits differ from JAX's by {diff:.3g}")
    return f"verified in peft: max |logit diff| {diff:.2g}"


def base_fingerprint(base_dir) -> str:
    """A content hash of the base model's weight files (sha256 over their bytes, sorted by name)."""
    h = hashlib.sha256()
    for f in sorted(Path(base_dir).glob("*.safetensors")) + sorted(Path(base_dir).glob("*.bin")):
        h.update(f.name.encode())
        with open(f, "rb") as fh:
            for block in iter(lambda: fh.read(1 << 24), b""):
                h.update(block)
    return h.hexdigest()[:16]
