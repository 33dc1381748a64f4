"""The one interface between a model family and the rest of sft_jax, and the registry of families.

Objectives, the core, sampling, chat, analysis, the planner and the benchmark see a model
only through a ``Family`` and the family's config (``ModelConfig``): the Flax module and its
call, the parameters' shapes and init, the logits and token NLL from hidden states, the KV
cache, the HF key map and export classes. They never import a family's package or name one
of its parameters. A family is registered in ``REGISTRY`` by the HF ``model_type`` values it
reads, and imported the first time one of them is asked for.

    family = get_family("gpt2")                 # from config.json's model_type
    family = family_of(cfg)                     # from a model config
    cfg = config_for_preset("demo", vocab_size=512)
    hidden = family.module(cfg).apply(params, tokens, positions, segment_ids, return_hidden=True)
    nll = family.token_nll(params, hidden, targets, cfg, chunk)   # (B,T) float32

Adding a family: a package ``sft_jax/models/NAME/`` whose ``__init__`` defines ``FAMILY``, with a
config that has the attributes and methods of ``ModelConfig`` (plus ``preset``, ``from_hf_config``
and ``from_dict`` class methods), a module built from ``sft_jax.models.layers`` with the call
above, and a ``KeyMap`` (``sft_jax.models.hf_io``) for its HF checkpoints; then one row in
``REGISTRY``. ``tests/test_llama_model.py`` shows the tests to copy (logits, packed rows and
cached decoding against transformers, the key map both ways).
"""

from __future__ import annotations

import dataclasses
import functools
import importlib
from typing import Any, Callable, Mapping, Protocol

DEFAULT_MODEL_TYPE = "gpt2"  # checkpoints written before the family was stored hold GPT-2

# family name -> (module defining FAMILY, the HF model_type values it reads). A new family is one
# more row; its module is imported on first use.
REGISTRY: dict[str, tuple[str, tuple[str, ...]]] = {
    "gpt2": ("sft_jax.models.gpt2", ("gpt2",)),
    "llama": ("sft_jax.models.llama", ("llama", "qwen2", "mistral")),
}
SUPPORTED_MODEL_TYPES = tuple(sorted(t for _, types in REGISTRY.values() for t in types))


class ModelConfig(Protocol):
    """What code shared by every family reads from a model config: a frozen, hashable dataclass
    (it is a static argument of jitted functions). Names follow transformers' common ones."""

    model_type: str  # HF config.json's model_type
    vocab_size: int  # real tokens
    padded_vocab_size: int  # rows of the embedding and the LM head (layers.common.padded_vocab)
    hidden_size: int  # D
    num_hidden_layers: int  # L
    num_attention_heads: int  # H (query heads)
    num_key_value_heads: int  # key/value heads (H without grouped-query attention)
    head_dim: int  # K
    max_position_embeddings: int  # the longest row the model runs (positions 0 .. this - 1)
    initializer_range: float
    bos_token_id: int
    eos_token_id: int
    # how to compute: dtype, compute_dtype, remat, scan_layers, attention, max_segments_per_row

    def replace(self, **changes) -> "ModelConfig": ...  # accepts the common names above too
    def to_dict(self) -> dict: ...
    def to_hf_config(self) -> dict: ...  # config.json of the family's causal-LM class
    def num_params(self, include_vocab_padding: bool = False) -> int: ...  # HF's num_parameters()
    def flops_per_token(self, seq_len: int, training: bool = True) -> float: ...
    def attention_flops_per_token(self, seq_len: int) -> int: ...  # its part that grows with seq_len
    def activations_per_token(self, remat: str) -> int: ...  # elements kept per token and layer


@dataclasses.dataclass(frozen=True)
class Family:
    """One architecture. ``params`` arguments are the whole tree (``{"params": ...}`` or its
    inside), so callers never pick a leaf: a tied family reads its embedding, an untied one its
    LM head."""

    name: str
    model_types: tuple[str, ...]  # HF config.json model_type values it reads
    config_cls: Any  # preset(name, **overrides), from_hf_config(dict, **overrides), from_dict(dict)
    presets: tuple[str, ...]  # names config_cls.preset takes
    module: Callable[[Any], Any]  # cfg -> Flax module, called (tokens, positions, segment_ids, *,
    #   cache=None, return_hidden=False) -> logits or hidden (B,T,V | D), plus the new cache with one
    param_shapes: Callable[[Any], Any]  # cfg -> abstract boxed params (logical axis names); allocates nothing
    init_params: Callable[[Any, Any], Any]  # (cfg, key) -> unboxed float32 params
    logits: Callable[..., Any]  # (params, hidden (B,T,D), cfg) -> (B,T,V) float32, padding -inf
    token_nll: Callable[..., Any]  # (params, hidden, targets (B,T), cfg, chunk=0) -> (B,T) float32
    init_cache: Callable[..., Any]  # (cfg, batch, max_len, dtype=None) -> an empty KV cache
    key_map: Callable[[Any], Any]  # cfg -> sft_jax.models.hf_io.KeyMap: where each parameter sits in HF files
    causal_lm_classes: Mapping[str, str]  # model_type -> transformers class of the LM export
    reward_classes: Mapping[str, str]  # model_type -> transformers class of the reward-model export
    score_key: str  # the reward head's tensor in that export, (1, D)
    arch_fields: tuple[str, ...]  # config fields that identify the architecture (a resume must match them)
    embedding_names: tuple[str, ...]  # parameter names of embedding tables (exempt from weight decay by default)
    # HF module names LoRA adapts when model.lora.targets is empty (PEFT's defaults for the architecture)
    lora_targets: tuple[str, ...] = ()


def _name_of(model_type: str) -> str:
    for name, (_, types) in REGISTRY.items():
        if model_type in types:
            return name
    raise ValueError(f"model_type {model_type!r} is not supported; supported: {', '.join(SUPPORTED_MODEL_TYPES)}")


@functools.cache
def _load(name: str) -> Family:
    module, types = REGISTRY[name]
    family = importlib.import_module(module).FAMILY
    if family.name != name or set(family.model_types) != set(types):
        raise AssertionError(f"{module}.FAMILY ({family.name}, {family.model_types}) does not match its "
                             f"registration ({name}, {types})")
    return family


def get_family(model_type: str) -> Family:
    """The family reading HF ``model_type``; ValueError naming the supported ones otherwise."""
    return _load(_name_of(model_type))


def family_of(cfg) -> Family:
    """The family of a model config (its ``model_type``)."""
    return get_family(cfg.model_type)


def families() -> list[Family]:
    return [_load(name) for name in REGISTRY]


def preset_names() -> list[str]:
    """Every family's presets (``model.preset``), sorted."""
    return sorted(p for f in families() for p in f.presets)


def config_for_preset(name: str, **overrides):
    """The config of preset ``name``, whichever family has it; ``overrides`` set fields (the
    common names of ``ModelConfig`` included)."""
    for family in families():
        if name in family.presets:
            return family.config_cls.preset(name, **overrides)
    raise ValueError(f"unknown model preset {name!r}; choose one of {preset_names()}")


def embedding_names() -> frozenset[str]:
    """Parameter names of every family's embedding tables."""
    return frozenset(n for f in families() for n in f.embedding_names)


# --- the config a checkpoint stores -------------------------------------------------------

def config_to_dict(cfg) -> dict:
    """The config's fields plus its ``model_type``, as a checkpoint stores them."""
    return {**cfg.to_dict(), "model_type": cfg.model_type}


def config_from_dict(d: dict):
    """The config ``config_to_dict`` wrote; a dict without ``model_type`` is GPT-2's (older checkpoints)."""
    d = dict(d)
    family = get_family(d.get("model_type", DEFAULT_MODEL_TYPE))
    if "model_type" not in {f.name for f in dataclasses.fields(family.config_cls)}:
        d.pop("model_type", None)  # a class-level constant of single-type families
    return family.config_cls.from_dict(d)


def unwrap(params) -> dict:
    """The parameter tree itself, whether given as ``{"params": tree}`` or as the tree."""
    return params["params"] if "params" in params else params


def stop_token_ids(cfg) -> tuple[int, ...]:
    """Every id that ends a reply: the config's EOS and the further ones a checkpoint lists
    (HF's ``eos_token_id`` may be a list, e.g. Llama 3's <|end_of_text|> and <|eot_id|>)."""
    ids = (cfg.eos_token_id, *getattr(cfg, "extra_eos_token_ids", ()))
    return tuple(dict.fromkeys(i for i in ids if i is not None))


def with_stop_token_ids(cfg, ids):
    """``cfg`` that also stops at ``ids`` (an HF ``generation_config.json``'s ``eos_token_id``, the
    token a chat template closes turns with). A family whose config holds one EOS only (GPT-2)
    takes ids equal to it and refuses others with a ValueError."""
    extra = tuple(i for i in dict.fromkeys(int(i) for i in ids if i is not None) if i not in stop_token_ids(cfg))
    if not extra:
        return cfg
    if not hasattr(cfg, "extra_eos_token_ids"):
        raise ValueError(f"{cfg.model_type} models stop at one id, eos_token_id={cfg.eos_token_id}; "
                         f"cannot also stop at {list(extra)}")
    return cfg.replace(extra_eos_token_ids=(*cfg.extra_eos_token_ids, *extra))
