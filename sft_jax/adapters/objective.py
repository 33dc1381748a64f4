"""Any objective with LoRA: the adapters (and any head) are the trained parameters, the base model is frozen.

``wrap(config, objective)`` returns the objective itself when ``model.lora.rank`` is 0 and no
``model.adapter`` is given, else a ``LoraObjective`` around it. The wrapper hands the core the
trained tree (float32, AdamW, the config's clip and schedule) and the base as a frozen parameter
in the compute dtype, so the core keeps no float32 master copy, gradient or Adam state for it,
and never checkpoints it. The trained tree is the inner objective's with each of its trunks
(``Objective.lora_trunks``: the causal LM, and PPO's critic when it sits on the base) replaced by
that trunk's adapters; heads (a reward model's score, a critic's value head) stay as they are.
The training loss runs the adapters unmerged, ``x W + s drop(x) A^T B^T`` as PEFT computes it
(``sft_jax.models.layers.common.project``; ``drop`` is PEFT's ``lora_dropout``, the identity at
``model.lora.dropout=0``), so no (in, out) update or gradient is formed; evaluation, generation,
rollouts and export see the merged trees ``W + s * A^T B^T`` through a view of the loop.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from sft_jax.adapters import lora
from sft_jax.config import ConfigError
from sft_jax.core import mesh as shd
from sft_jax.models.layers.common import LORA
from sft_jax.objectives.base import Objective

VERIFY_ATOL = 1e-4  # peft (torch float32) vs JAX float32 logits at export
SEED = "lora_dropout_seed"  # per-row dropout seeds in a training batch under adapter dropout


def enabled(config) -> bool:
    return config.model.uses_lora()


def wrap(config, objective):
    """``objective`` trained through LoRA adapters when the config asks for them."""
    if not enabled(config):
        return objective
    if not objective.supports_lora:
        raise ConfigError(f"model.lora and model.adapter: {type(objective).__name__} cannot train through adapters")
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
        # a bare Loss (no parameters of its own besides the causal LM) has the one trunk
        self.whole = isinstance(inner, Objective)
        self.trunks = inner.lora_trunks() if self.whole else (("params",),)
        self._expand = jax.jit(self.expand)
        # adapter dropout (PEFT's lora_dropout) on the adapters' input in the training loss, one
        # key per row from the step's row seeds (``rollout``)
        self.dropout = inner.config.model.lora.dropout if inner.config is not None else 0.0
        if self.dropout:
            self.batch_axes = {**inner.batch_axes, SEED: ("batch",)}
        self._loaded_base = None  # the base as initial_params read it, for frozen_params on a fresh start

    # --- what the step traces -------------------------------------------------------------
    def expand(self, params, base):
        """The inner objective's parameter tree: each trunk the base merged with its own
        adapters, every other parameter as trained."""
        for path in self.trunks:
            merged = lora.merge(base, {"params": _at(params, path)}, self.spec)["params"]
            params = _with(params, path, merged)
        return params

    def inner_frozen(self, frozen):
        """The inner objective's frozen parameters: the base stands in for the starting model."""
        base, inner = frozen
        if not getattr(self.inner, "frozen_is_start", False):
            return inner
        return base if inner is None else {**inner, "params": base["params"]}

    def unmerged(self, params, base, seeds=None, dropout=None):
        """The inner objective's parameter tree for a training step: each trunk the base, with
        beside each targeted kernel its adapters, their scale and, under adapter dropout, the
        rows' dropout keys (read by models.layers.common.project, which adds the low-rank term
        as two thin matmuls, so no (in, out) update or gradient is formed)."""
        L = self.model_cfg.num_hidden_layers
        dropout = self.dropout if dropout is None else dropout
        root = jax.random.key(self.config.train.seed if self.config is not None else 0)
        for n, path in enumerate(self.trunks):
            trunk = base["params"]
            for i, t in enumerate(self.spec.targets):
                ab = _at(_at(params, path), t.path)
                entry = {"a": ab[lora.A_NAME], "b": ab[lora.B_NAME],  # (L, r, in), (L, out, r)
                         "scale": jnp.full((L,), self.spec.scale, jnp.float32)}
                if seeds is not None:
                    target_key = jax.random.fold_in(jax.random.fold_in(root, n), i)
                    entry["keys"] = jax.vmap(lambda layer: jax.vmap(lambda seed: jax.random.key_data(  # (L, rows, 2)
                        jax.random.fold_in(jax.random.fold_in(target_key, layer), seed)))(seeds))(jnp.arange(L))
                    entry["keep"] = jnp.full((L,), 1.0 - dropout, jnp.float32)
                trunk = _with(trunk, t.path[:-1] + (t.path[-1] + LORA,), entry)
            params = _with(params, path, trunk)
        return params

    def loss(self, params, frozen, batch):
        seeds = None
        if self.dropout:
            seeds, batch = batch[SEED], {k: v for k, v in batch.items() if k != SEED}
        return self.inner.loss(self.unmerged(params, frozen[0], seeds), self.inner_frozen(frozen), batch)

    def normalizer(self, batch):
        return self.inner.normalizer(batch)

    def batch_metrics(self, batch):
        return self.inner.batch_metrics(batch)

    def eval_sums(self, params, frozen, batch):  # no dropout: the merged model
        batch = {k: v for k, v in batch.items() if k != SEED}
        return self.inner.eval_sums(self.expand(params, frozen[0]), self.inner_frozen(frozen), batch)

    # --- parameters -----------------------------------------------------------------------
    def abstract_params(self):
        tree = self.inner.abstract_params() if self.whole else {}
        adapters = lora.abstract_adapters(self.model_cfg, self.spec)["params"]
        for path in self.trunks:
            tree = _with(tree, path, adapters)
        return tree

    def with_adapters(self, tree, key):
        """``tree`` (float32) with each trunk replaced by fresh adapters (the first from ``key``,
        or ``model.adapter``'s)."""
        tree = jax.tree.map(lambda x: x.astype(jnp.float32), tree)
        for i, path in enumerate(self.trunks):
            adapters = lora.init_adapters(self.model_cfg, self.spec, key if i == 0 else jax.random.fold_in(key, i))
            tree = _with(tree, path, adapters["params"])
        return tree

    def init_params(self, key):
        # the inner objective's heads; its trunks' draws are unused and compiled away
        heads = _with(self.inner.init_params(key), self.trunks[0], None) if self.whole else {}
        return self.with_adapters(heads, key)

    def initial_params(self, shardings):
        """The inner objective's starting heads (from its model directory) beside the adapters;
        the base it loaded is kept for ``frozen_params``."""
        mesh = jax.tree.leaves(shardings)[0].mesh
        full = self.inner.initial_params(shd.logical_shardings(mesh, self.inner.abstract_params()))
        key = jax.random.key(self.config.train.seed)
        if full is None and self.start is None:
            return None
        with shd.rules_context(mesh):
            if full is None:
                params = jax.jit(self.init_params, out_shardings=shardings)(key)
            else:
                self._loaded_base = {"params": full["params"]}
                params = jax.jit(self.with_adapters, out_shardings=shardings)(_with(full, self.trunks[0], None), key)
        if self.start is not None:
            params = _with(params, self.trunks[0], jax.device_put(self.start["params"], _at(shardings, self.trunks[0])))
        return params

    def frozen_params(self, mesh):
        """The base (the inner objective's starting causal LM) in the compute dtype, plus the
        inner objective's own frozen parameters (besides its starting model)."""
        sh = shd.logical_shardings(mesh, self.inner.abstract_params())
        base_sh = {"params": sh["params"]}
        base, self._loaded_base = self._loaded_base, None
        if base is None:
            full = self.inner.initial_params(sh)
            base = None if full is None else {"params": full["params"]}
        dtype = jnp.dtype(self.model_cfg.dtype)
        cast = lambda tree: jax.tree.map(lambda x: x.astype(dtype), tree)
        with shd.rules_context(mesh):
            if base is None:
                key = jax.random.key(self.config.train.seed)
                base = jax.jit(lambda k: cast({"params": self.inner.init_params(k)["params"]}),
                               out_shardings=base_sh)(key)
            else:
                base = jax.jit(cast, out_shardings=base_sh, donate_argnums=0)(base)
        if getattr(self.inner, "frozen_is_start", False):
            inner = self.inner.frozen_besides_start(mesh)
        else:
            inner = self.inner.frozen_params(mesh)
        inner_params, inner_sh = inner if inner is not None else (None, None)
        return (base, inner_params), (base_sh, inner_sh)

    def optimizer(self, tx):
        """The inner objective's (PPO scales the critic's updates, adapters and head alike)."""
        return self.inner.optimizer(tx) if self.whole else tx

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
        batch = self.inner.rollout(MergedView(loop, self), step, batch)
        if not self.dropout:
            return batch
        rows = len(next(iter(batch.values())))  # this process's rows; their global index seeds them
        first = step * rows * jax.process_count() + jax.process_index() * rows
        return {**batch, SEED: ((first + np.arange(rows, dtype=np.uint64)) % 2**32).astype(np.uint32)}

    def on_save(self, loop, step):
        self.inner.on_save(MergedView(loop, self), step)

    def evaluate(self, loop, step):
        return self.inner.evaluate(MergedView(loop, self), step)

    def merged(self, loop):
        return self._expand(loop.host_params(), loop.frozen[0])

    def export(self, loop, out: Path) -> list[str]:
        """The PEFT adapter at ``out/adapter`` (verified in peft when torch and peft are
        importable), and with ``run.export_merged`` the merged model as the inner export. A
        reward model (``lora_task`` SEQ_CLS) saves its score head beside the adapters as PEFT
        saves ``modules_to_save``, and always writes the merged export too: ``ppo.reward_model``
        reads that one."""
        lines = []
        adapter_dir = out / "adapter"
        trained = loop.host_params()
        task = self.inner.lora_task
        if jax.process_index() == 0:
            base = str(self.hf_dir) if self.hf_dir is not None else None
            merged = self.merged(loop)
            heads = {k: np.asarray(v) for k, v in self.inner.head_tensors(jax.device_get(trained)).items()}
            lora.save_peft(adapter_dir, self.model_cfg, self.spec, trained, base=base, task_type=task, heads=heads,
                           dropout=self.dropout)
            checked = verify_peft(adapter_dir, self.hf_dir, self.model_cfg, merged, task)
            lines.append(f"PEFT adapter: {adapter_dir}" + (f" ({checked})" if checked else ""))
        if self.config.run.export_merged or task == "SEQ_CLS":
            lines += self.inner.export(MergedView(loop, self), out)
        return lines


def _at(tree, path: tuple[str, ...]):
    for p in path:
        tree = tree[p]
    return tree


def _with(tree: dict, path: tuple[str, ...], value) -> dict:
    """A copy of ``tree`` (new dicts along ``path`` only) holding ``value`` at ``path``."""
    if not path:
        return value
    return {**tree, path[0]: _with(tree.get(path[0], {}), path[1:], value)}


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

    @functools.cached_property
    def state(self):
        """The train state with the merged parameters on the mesh (what PPO samples from)."""
        loop = self._loop
        with shd.rules_context(loop.mesh):
            params = self._objective._expand(loop.state.params, loop.frozen[0])
        return dataclasses.replace(loop.state, params=params)

    def host_params(self):
        return self._objective.merged(self._loop)

    def held_out_sums(self, batches):
        """The loop's, on batches shaped as the step's (with row seeds that evaluation ignores)."""
        if not self._objective.dropout:
            return self._loop.held_out_sums(batches)
        seeded = ({**b, SEED: np.zeros(len(next(iter(b.values()))), np.uint32)} for b in batches)
        return self._loop.held_out_sums(seeded)


def verify_peft(adapter_dir: Path, base_dir, cfg, merged, task: str = "CAUSAL_LM") -> str:
    """peft's outputs of base + adapter against the JAX merged model's: the causal LM's logits,
    or (SEQ_CLS) the scores of ``AutoModelForSequenceClassification`` (base, one label, pad = EOS)
    with the adapter's saved score head, on right-padded rows. '' when torch or peft is not
    importable or there is no base directory to load."""
    try:
        import torch
        import transformers
        from peft import PeftModel
    except ImportError:
        return ""
    if base_dir is None:
        return ""
    from sft_jax.models import hf_io, hf_reward

    cfg32 = cfg.replace(dtype="float32", remat="none")
    trunk = jax.device_get({"params": merged["params"]})
    if task == "SEQ_CLS":
        what, tokens, index = "score", *hf_reward.verify_rows(cfg32)
        want = hf_reward.jax_scores(trunk, merged["head"], cfg32, tokens, index)
        base = transformers.AutoModelForSequenceClassification.from_pretrained(
            str(base_dir), num_labels=1, pad_token_id=cfg.eos_token_id, dtype=torch.float32)
        read = lambda out: out.logits[:, 0]  # noqa: E731  transformers reads the last token before the first pad
    else:
        what, tokens = "logit", np.asarray(hf_io.verify_tokens(cfg32))
        want = np.asarray(hf_io.logits_of(cfg32, trunk, tokens))[..., :cfg.vocab_size]
        base = transformers.AutoModelForCausalLM.from_pretrained(str(base_dir), torch_dtype=torch.float32)
        read = lambda out: out.logits  # noqa: E731
    model = PeftModel.from_pretrained(base, str(adapter_dir)).eval()
    with torch.no_grad():
        got = read(model(input_ids=torch.as_tensor(tokens, dtype=torch.long))).float().numpy()
    diff = float(np.max(np.abs(got - want)))
    if not diff <= VERIFY_ATOL:
        raise RuntimeError(f"exported adapter {adapter_dir}: peft's {what}s differ from JAX's by {diff:.3g}")
    return f"verified in peft: max |{what} diff| {diff:.2g}"


def base_fingerprint(base_dir) -> str:
    """A content hash of the base model's weight files (sha256 over their bytes, sorted by name)."""
    h = hashlib.sha256()
    for f in sorted(Path(base_dir).glob("*.safetensors")) + sorted(Path(base_dir).glob("*.bin")):
        h.update(f.name.encode())
        with open(f, "rb") as fh:
            for block in iter(lambda: fh.read(1 << 24), b""):
                h.update(block)
    return h.hexdigest()[:16]
