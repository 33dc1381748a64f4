"""Hugging Face Llama / Qwen2 / Mistral <-> sft_jax parameters: the key map that
``sft_jax.models.hf_io`` reads and exports directories with (slice by slice, any family), and the
same mapping for in-memory state dicts.

The mapping lives in ``_layout`` below, beside the quirks it handles:
  * nn.Linear stores weights as (out, in); our kernels are (in, out) with the head axes split
    out: q_proj (H*K, D) -> (D,H,K), k/v_proj (G*K, D) -> (D,G,K), o_proj (D, H*K) -> (H,K,D).
  * Per-layer tensors model.layers.{i}.* are stacked on a leading L axis (scanned layers).
  * embed_tokens and lm_head have padded_vocab_size rows here: padding rows are zero on import
    and trimmed on export. lm_head.weight exists only when the embeddings are untied; a tied
    model's state dict may still list it (the same tensor) and it is then ignored.
  * Rotary inv_freq buffers in old checkpoints are derived from the config, not weights: ignored.
"""

from __future__ import annotations

import re
from typing import Any, Mapping

import ml_dtypes
import numpy as np

from sft_jax.models.hf_io import KeyMap
from sft_jax.models.llama.model import MODEL_TYPES, LlamaConfig

CAUSAL_LM_CLASSES = MODEL_TYPES
# the reward model: the trunk plus a bias-free score head, score.weight (1, D)
REWARD_CLASSES = {"llama": "LlamaForSequenceClassification", "qwen2": "Qwen2ForSequenceClassification",
                  "mistral": "MistralForSequenceClassification"}
SCORE_KEY = "score.weight"

# (HF key, our path, HF shape, our shape, transposed): transposed HF weights are (out, in)
_Entry = tuple[str, tuple[str, ...], tuple[int, ...], tuple[int, ...], bool]
_IGNORED = re.compile(r"(^|\.)rotary_emb\.inv_freq$")
_IGNORED_TIED = re.compile(r"(^|\.)rotary_emb\.inv_freq$|^lm_head\.weight$")


def _layout(cfg: LlamaConfig) -> tuple[list[_Entry], list[_Entry]]:
    """(top-level entries, per-layer entries with HF keys relative to model.layers.{i}.)."""
    D, F, H, G, K, V = (cfg.hidden_size, cfg.intermediate_size, cfg.num_attention_heads,
                        cfg.num_key_value_heads, cfg.head_dim, cfg.vocab_size)
    top = [("model.embed_tokens.weight", ("embed_tokens",), (V, D), (V, D), False),
           ("model.norm.weight", ("norm", "scale"), (D,), (D,), False)]
    if not cfg.tie_word_embeddings:
        top.append(("lm_head.weight", ("lm_head",), (V, D), (V, D), False))
    attn, mlp = ("self_attn",), ("mlp",)
    layer = [
        ("input_layernorm.weight", ("input_layernorm", "scale"), (D,), (D,), False),
        ("self_attn.q_proj.weight", attn + ("q_proj_kernel",), (H * K, D), (D, H, K), True),
        ("self_attn.k_proj.weight", attn + ("k_proj_kernel",), (G * K, D), (D, G, K), True),
        ("self_attn.v_proj.weight", attn + ("v_proj_kernel",), (G * K, D), (D, G, K), True),
        ("self_attn.o_proj.weight", attn + ("o_proj_kernel",), (D, H * K), (H, K, D), True),
        ("post_attention_layernorm.weight", ("post_attention_layernorm", "scale"), (D,), (D,), False),
        ("mlp.gate_proj.weight", mlp + ("gate_proj_kernel",), (F, D), (D, F), True),
        ("mlp.up_proj.weight", mlp + ("up_proj_kernel",), (F, D), (D, F), True),
        ("mlp.down_proj.weight", mlp + ("down_proj_kernel",), (D, F), (F, D), True),
    ]
    if cfg.attention_bias:
        layer += [("self_attn.q_proj.bias", attn + ("q_proj_bias",), (H * K,), (H, K), False),
                  ("self_attn.k_proj.bias", attn + ("k_proj_bias",), (G * K,), (G, K), False),
                  ("self_attn.v_proj.bias", attn + ("v_proj_bias",), (G * K,), (G, K), False)]
    if cfg.attention_out_bias:
        layer.append(("self_attn.o_proj.bias", attn + ("o_proj_bias",), (D,), (D,), False))
    return top, layer


def key_map(cfg: LlamaConfig) -> KeyMap:
    """The layout for ``sft_jax.models.hf_io`` (slice-by-slice import, verified export)."""
    top, layer = _layout(cfg)
    rows = lambda entries: tuple((key, "/".join(path), hf_shape, shape) for key, path, hf_shape, shape, _ in entries)
    transposed = frozenset("/".join(path) for _, path, _, _, t in top + layer if t)
    return KeyMap(prefix="", global_layout=rows(top), layer_layout=rows(layer), layer_key="model.layers.{i}.",
                  stack="layers", ignored=_IGNORED_TIED if cfg.tie_word_embeddings else _IGNORED,
                  vocab_axes=(("embed_tokens", 0), ("lm_head", 0)), transposed=transposed)


def _expected_keys(cfg: LlamaConfig) -> dict[str, tuple[int, ...]]:
    top, layer = _layout(cfg)
    keys = {key: hf_shape for key, _, hf_shape, _, _ in top}
    for i in range(cfg.num_hidden_layers):
        keys.update({f"model.layers.{i}.{key}": hf_shape for key, _, hf_shape, _, _ in layer})
    return keys


def _to_hf(x: np.ndarray, hf_shape: tuple[int, ...], transposed: bool) -> np.ndarray:
    return np.ascontiguousarray(x.reshape(hf_shape[::-1]).T if transposed else x.reshape(hf_shape))


def _from_hf(x: np.ndarray, shape: tuple[int, ...], transposed: bool) -> np.ndarray:
    return np.ascontiguousarray((x.T if transposed else x).reshape(shape))


def _float32(x: Any) -> np.ndarray:
    """numpy float32 from a numpy (bf16 included), jax or torch array."""
    if type(x).__module__.startswith("torch"):
        import torch

        return x.detach().to(device="cpu", dtype=torch.float32).numpy()
    return np.asarray(x).astype(np.float32)


def _get(tree: Mapping, path: tuple[str, ...]):
    for p in path:
        tree = tree[p]
    return tree


def _set(tree: dict, path: tuple[str, ...], value) -> None:
    for p in path[:-1]:
        tree = tree.setdefault(p, {})
    tree[path[-1]] = value


# --- the mapping, both ways --------------------------------------------------------

def to_hf_state_dict(params, cfg: LlamaConfig, dtype: str = "float32") -> dict[str, np.ndarray]:
    """Host numpy arrays under the HF class's keys (un-padded vocab; lm_head only when untied)."""
    np_dtype = {"float32": np.float32, "bfloat16": ml_dtypes.bfloat16}[dtype]
    inner = params["params"] if "params" in params else params
    top, layer = _layout(cfg)
    out = {}
    for key, path, hf_shape, shape, transposed in top:
        value = _float32(_get(inner, path))
        if path in (("embed_tokens",), ("lm_head",)):
            value = value[:cfg.vocab_size]
        out[key] = _to_hf(value, hf_shape, transposed).astype(np_dtype)
    for key, path, hf_shape, shape, transposed in layer:
        stacked = _float32(_get(inner, ("layers",) + path))
        if stacked.shape != (cfg.num_hidden_layers,) + shape:
            raise ValueError(f"param layers/{'/'.join(path)} has shape {stacked.shape}, "
                             f"expected {(cfg.num_hidden_layers,) + shape}")
        for i in range(cfg.num_hidden_layers):
            out[f"model.layers.{i}.{key}"] = _to_hf(stacked[i], hf_shape, transposed).astype(np_dtype)
    return out


def _listed(keys: list[str], n: int = 8) -> str:
    return ", ".join(keys[:n]) + (f" ... ({len(keys)} in all)" if len(keys) > n else "")


def from_hf_state_dict(tensors: Mapping[str, Any], cfg: LlamaConfig) -> dict:
    """``{"params": ...}`` of float32 numpy arrays from HF tensors (numpy of any float dtype,
    jax or torch); the inverse of ``to_hf_state_dict``. Raises ValueError naming missing,
    unexpected or misshapen tensors."""
    expected = _expected_keys(cfg)
    present = set(tensors)
    ignored = {k for k in present if _IGNORED.search(k)}
    if cfg.tie_word_embeddings:
        ignored |= {"lm_head.weight"} & present  # the tied table itself, listed twice by torch
    missing = sorted(set(expected) - present)
    unexpected = sorted(present - set(expected) - ignored)
    if missing or unexpected:
        raise ValueError(f"HF tensors do not match this {cfg.model_type} config: "
                         f"missing [{_listed(missing)}]; unexpected [{_listed(unexpected)}]")
    for key, shape in expected.items():
        got = tuple(tensors[key].shape)
        if got != shape:
            raise ValueError(f"HF tensor {key!r} has shape {got}, expected {shape}")

    top, layer = _layout(cfg)
    params: dict = {}
    for key, path, hf_shape, shape, transposed in top:
        value = _from_hf(_float32(tensors[key]), shape, transposed)
        if path in (("embed_tokens",), ("lm_head",)):  # padding rows: zeros
            value = np.pad(value, ((0, cfg.padded_vocab_size - cfg.vocab_size), (0, 0)))
        _set(params, path, value)
    for key, path, hf_shape, shape, transposed in layer:
        stacked = np.stack([_from_hf(_float32(tensors[f"model.layers.{i}.{key}"]), shape, transposed)
                            for i in range(cfg.num_hidden_layers)])
        _set(params, ("layers",) + path, stacked)
    return {"params": params}
