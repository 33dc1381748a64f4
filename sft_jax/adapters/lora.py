"""Low-rank adapters (LoRA, Hu et al. 2021) on any family, in PEFT's format.

A targeted projection ``y = x W`` (W as (in, out)) becomes ``y = x W + s * x A^T B^T`` with
A (r, in), B (out, r) and s = alpha / r (alpha / sqrt(r) with rsLoRA), exactly PEFT's
``LoraLayer``. In training the loss adds ``s * (x A^T) B^T`` beside each targeted kernel as
two thin matmuls (sft_jax.models.layers.common.project, fed by sft_jax.adapters.objective), so
no (in, out) update or gradient is formed; evaluation, generation and export merge
``W + s * A^T B^T`` into a copy of the tree (``merge``), which every family runs unchanged. Everything a target needs comes from the
family's HF key map: a target is a per-layer weight whose HF tensor is 2-D (``attn.c_attn.weight``), named by its
module (``c_attn``), as PEFT's ``target_modules`` names it; Linear weights are stored (out, in),
GPT-2's Conv1D ones (in, out), and the key map says which.

The adapter tree mirrors the base tree: ``{"params": {stack: {..., kernel: {"lora_a_kernel":
(L, r, in), "lora_b_kernel": (L, out, r)}}}}``, so a PEFT file maps onto it layer by layer.
"""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from sft_jax.models import hf_io
from sft_jax.models.family import family_of

ALL_LINEAR = "all-linear"
A_NAME, B_NAME = "lora_a_kernel", "lora_b_kernel"  # "_kernel": weight decay treats them as matrices
PEFT_PREFIX = "base_model.model."  # PeftModelForCausalLM's prefix before the base model's keys
CONFIG_FILE, WEIGHTS_FILE = "adapter_config.json", "adapter_model.safetensors"


class AdapterError(ValueError):
    """A LoRA setting or adapter file that does not fit the model."""


@dataclasses.dataclass(frozen=True)
class Target:
    """One adapted weight of every layer."""

    module: str  # PEFT's module name, e.g. c_attn
    hf_key: str  # per-layer HF key, e.g. attn.c_attn.weight
    path: tuple[str, ...]  # the stacked kernel under params["params"], e.g. ("h", "attn", "c_attn_kernel")
    shape: tuple[int, ...]  # our per-layer kernel shape, e.g. (D, 3, H, K)
    fan_in: int
    fan_out: int
    conv1d: bool  # HF stores it (in, out) (GPT-2's Conv1D); Linear stores (out, in)
    in_axis: str | None  # logical axis of the kernel's input side (the outermost one)
    out_axis: str | None


@dataclasses.dataclass(frozen=True)
class LoraSpec:
    """What the adapters are: rank, scale and targets, for one model config."""

    rank: int
    alpha: float
    rslora: bool
    targets: tuple[Target, ...]

    @property
    def scale(self) -> float:
        return self.alpha / (math.sqrt(self.rank) if self.rslora else self.rank)

    @property
    def modules(self) -> list[str]:
        return sorted({t.module for t in self.targets})


def module_name(hf_key: str) -> str:
    return hf_key.rsplit(".", 2)[-2]


def candidate_targets(cfg) -> list[Target]:
    """Every per-layer weight of the family that an adapter can target (2-D HF tensors)."""
    family = family_of(cfg)
    keys = family.key_map(cfg)
    boxed = family.param_shapes(cfg)
    inner = boxed["params"] if "params" in boxed else boxed
    rows = {k: p for k, p, _, _ in keys.layer_layout}
    out = []
    for t in hf_io.tensor_layout(cfg, keys):
        if not t.stacked or len(t.hf_shape) != 2:
            continue
        hf_key = next(k for k, p in rows.items() if (keys.stack,) + tuple(p.split("/")) == t.path)
        if not hf_key.endswith(".weight"):
            continue
        node = inner
        for p in t.path:
            node = node[p]
        names = tuple(node.names)[1:] if isinstance(node, nn.Partitioned) else (None,) * len(t.shape)
        groups = t.groups
        fan_in, fan_out = t.hf_view
        out.append(Target(module_name(hf_key), hf_key, t.path, t.shape, fan_in, fan_out, not t.transpose,
                          names[groups[0][0]], names[groups[1][0]]))
    return out


def default_targets(cfg) -> tuple[str, ...]:
    return family_of(cfg).lora_targets


def resolve(cfg, rank: int, alpha: float, rslora: bool, targets: str | tuple[str, ...] = "") -> LoraSpec:
    """The spec for ``targets`` (comma-separated module names, ``all-linear``, or empty for the
    family's default); AdapterError naming the modules the family has for an unknown one."""
    names = tuple(n.strip() for n in targets.split(",") if n.strip()) if isinstance(targets, str) else tuple(targets)
    names = names or default_targets(cfg)
    candidates = candidate_targets(cfg)
    have = sorted({t.module for t in candidates})
    if ALL_LINEAR in names:
        chosen = candidates
    else:
        unknown = [n for n in names if n not in have]
        if unknown:
            raise AdapterError(f"model.lora.targets: {family_of(cfg).name} has no module {unknown[0]!r}; "
                               f"it has {', '.join(have)} (or {ALL_LINEAR})")
        chosen = [t for t in candidates if t.module in names]
    if rank < 1:
        raise AdapterError(f"model.lora.rank={rank}: expected >= 1")
    return LoraSpec(rank, float(alpha), bool(rslora), tuple(chosen))


# --- the adapter tree ------------------------------------------------------------------

def _set(tree: dict, path: tuple[str, ...], value) -> None:
    for p in path[:-1]:
        tree = tree.setdefault(p, {})
    tree[path[-1]] = value


def _get(tree, path: tuple[str, ...]):
    for p in path:
        tree = tree[p]
    return tree


def _targets_of(tree: dict, spec: LoraSpec):
    inner = tree["params"]
    return [(t, _get(inner, t.path)) for t in spec.targets]


def abstract_adapters(cfg, spec: LoraSpec) -> dict:
    """Flax-boxed abstract adapters: A (layers, r, in) sharded like the kernel's input side,
    B (layers, out, r) like its output side."""
    L, r = cfg.num_hidden_layers, spec.rank
    tree: dict = {}
    for t in spec.targets:
        a = jax.ShapeDtypeStruct((L, r, t.fan_in), jnp.float32)
        b = jax.ShapeDtypeStruct((L, t.fan_out, r), jnp.float32)
        _set(tree, t.path, {A_NAME: nn.Partitioned(a, ("layers", None, t.in_axis)),
                            B_NAME: nn.Partitioned(b, ("layers", t.out_axis, None))})
    return {"params": tree}


def init_adapters(cfg, spec: LoraSpec, key) -> dict:
    """A as PEFT initialises it (Kaiming-uniform with a = sqrt(5): U(-1/sqrt(in), 1/sqrt(in))),
    B zero, so the adapted model starts as the base exactly."""
    L, r = cfg.num_hidden_layers, spec.rank
    tree: dict = {}
    for i, t in enumerate(spec.targets):
        bound = 1.0 / math.sqrt(t.fan_in)
        a = jax.random.uniform(jax.random.fold_in(key, i), (L, r, t.fan_in), jnp.float32, -bound, bound)
        _set(tree, t.path, {A_NAME: a, B_NAME: jnp.zeros((L, t.fan_out, r), jnp.float32)})
    return {"params": tree}


def merge(base: dict, adapters: dict, spec: LoraSpec) -> dict:
    """The base tree with each target's kernel replaced by W + s * A^T B^T (float32; the model
    casts to its compute dtype as it does any kernel). Differentiable in the adapters."""
    merged = jax.tree.map(lambda x: x, base)  # new containers, same leaves
    inner = merged["params"] if "params" in merged else merged
    for t, ab in _targets_of(adapters, spec):
        w = _get(inner, t.path)
        delta = jnp.einsum("lri,lor->lio", ab[A_NAME], ab[B_NAME]) * spec.scale
        _set(inner, t.path, w.astype(jnp.float32) + delta.reshape(w.shape))
    return merged


# --- PEFT files ----------------------------------------------------------------------------

def peft_keys(cfg, target: Target, layer: int) -> tuple[str, str]:
    """The keys PEFT saves for ``target`` of ``layer`` (adapter name removed, as on disk)."""
    keys = family_of(cfg).key_map(cfg)
    module = PEFT_PREFIX + keys.prefix + keys.layer_key.format(i=layer) + target.hf_key[:-len("weight")]
    return module + "lora_A.weight", module + "lora_B.weight"


def read_adapter_config(path) -> dict:
    f = Path(path) / CONFIG_FILE
    try:
        return json.loads(f.read_text())
    except (OSError, ValueError) as e:
        raise AdapterError(f"model.adapter={str(path)!r}: no readable {CONFIG_FILE} ({e})") from None


def load_peft(path, cfg) -> tuple[LoraSpec, dict]:
    """(spec, adapters as numpy) from a PEFT LoRA directory for a model of config ``cfg``."""
    conf = read_adapter_config(path)
    if conf.get("peft_type", "LORA") != "LORA":
        raise AdapterError(f"model.adapter={str(path)!r}: a {conf.get('peft_type')} adapter; only LORA is read")
    for unsupported in ("rank_pattern", "alpha_pattern", "layers_to_transform", "modules_to_save"):
        if conf.get(unsupported):
            raise AdapterError(f"model.adapter={str(path)!r}: {unsupported} is not supported")
    if conf.get("use_dora"):
        raise AdapterError(f"model.adapter={str(path)!r}: DoRA adapters are not supported")
    weights = Path(path) / WEIGHTS_FILE
    if not weights.is_file():
        raise AdapterError(f"model.adapter={str(path)!r}: no {WEIGHTS_FILE}")
    from safetensors.numpy import load_file

    tensors = load_file(str(weights))
    r = int(conf["r"])
    candidates = candidate_targets(cfg)
    chosen = [t for t in candidates if peft_keys(cfg, t, 0)[0] in tensors]
    known = {k for t in candidates for i in range(cfg.num_hidden_layers) for k in peft_keys(cfg, t, i)}
    stray = sorted(set(tensors) - known)
    if stray or not chosen:
        raise AdapterError(f"model.adapter={str(path)!r} does not fit this {family_of(cfg).name} model: "
                           f"{'unexpected tensor ' + repr(stray[0]) if stray else 'no tensor of a known module'}")
    spec = LoraSpec(r, float(conf.get("lora_alpha", 8)), bool(conf.get("use_rslora", False)), tuple(chosen))
    tree: dict = {}
    for t in chosen:
        a_layers, b_layers = [], []
        for i in range(cfg.num_hidden_layers):
            ka, kb = peft_keys(cfg, t, i)
            if ka not in tensors or kb not in tensors:
                raise AdapterError(f"model.adapter={str(path)!r}: {ka if ka not in tensors else kb} is missing")
            a, b = tensors[ka], tensors[kb]
            if a.shape != (r, t.fan_in) or b.shape != (t.fan_out, r):
                raise AdapterError(f"model.adapter={str(path)!r}: {ka} is {a.shape} and lora_B {b.shape}; "
                                   f"this model needs {(r, t.fan_in)} and {(t.fan_out, r)}")
            a_layers.append(a.astype(np.float32))
            b_layers.append(b.astype(np.float32))
        _set(tree, t.path, {A_NAME: np.stack(a_layers), B_NAME: np.stack(b_layers)})
    return spec, {"params": tree}


def peft_config(cfg, spec: LoraSpec, base: str | None, dropout: float = 0.0, task_type: str = "CAUSAL_LM",
                modules_to_save: list[str] | None = None) -> dict:
    return {
        "peft_type": "LORA", "task_type": task_type, "r": spec.rank, "lora_alpha": spec.alpha,
        "lora_dropout": dropout, "target_modules": spec.modules, "use_rslora": spec.rslora,
        "fan_in_fan_out": any(t.conv1d for t in spec.targets), "bias": "none",
        "base_model_name_or_path": base, "inference_mode": True, "modules_to_save": modules_to_save,
    }


def peft_state_dict(cfg, spec: LoraSpec, adapters) -> dict[str, np.ndarray]:
    host = jax.device_get(adapters)
    out = {}
    for t, ab in _targets_of(host, spec):
        a, b = np.asarray(ab[A_NAME], np.float32), np.asarray(ab[B_NAME], np.float32)
        for i in range(cfg.num_hidden_layers):
            ka, kb = peft_keys(cfg, t, i)
            out[ka], out[kb] = np.ascontiguousarray(a[i]), np.ascontiguousarray(b[i])
    return out


def save_peft(out_dir, cfg, spec: LoraSpec, adapters, *, base: str | None, dropout: float = 0.0,
              task_type: str = "CAUSAL_LM", heads: dict[str, np.ndarray] | None = None) -> Path:
    """``adapter_model.safetensors`` + ``adapter_config.json`` as PEFT's ``save_pretrained`` writes them.
    ``heads``: whole HF tensors trained beside the adapters (``{"score.weight": (1, D)}``), saved
    as PEFT saves ``modules_to_save``: under the module's own key, without the wrapper's
    ``modules_to_save.<adapter>`` infix, and the module listed in the config."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tensors = peft_state_dict(cfg, spec, adapters)
    heads = heads or {}
    tensors.update({PEFT_PREFIX + k: np.ascontiguousarray(v, np.float32) for k, v in heads.items()})
    modules = sorted({k.rsplit(".", 1)[0] for k in heads}) or None
    hf_io.write_safetensors(tensors, out / WEIGHTS_FILE)
    conf = peft_config(cfg, spec, base, dropout, task_type, modules)
    (out / CONFIG_FILE).write_text(json.dumps(conf, indent=2) + "\n")
    return out

