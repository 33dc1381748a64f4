"""The Llama architecture in Flax (Linen), read top to bottom: config, RMSNorm, rotary embeddings,
grouped-query attention, SwiGLU MLP, decoder layer, model, loss head.

One module serves three Hugging Face classes that share the architecture:
``LlamaForCausalLM`` (Llama 2/3), ``Qwen2ForCausalLM`` (adds q/k/v biases) and
``MistralForCausalLM`` (adds a sliding window, accepted here only when it covers the whole
sequence, where it equals full attention).

Axis letters used in shapes and einsums:
  B batch, T query length, S key length, D embed, H query heads, G kv heads, K head dim,
  F mlp, V (padded) vocab, L layers.

Every parameter carries logical axis names (``vocab``, ``embed``, ``heads``, ``kv_heads``,
``head_dim``, ``mlp``, ``norm``, ``layers``); the trainer maps them onto the mesh with one
rules table. Parameters live in float32; compute runs in ``config.dtype``.

The call interface is every family's (``sft_jax.models.family``): ``module(tokens, positions,
segment_ids, *, cache=None, return_hidden=False)``. Rotary angles come from ``positions``, which restart
at 0 for each packed document, so a packed row computes what each document computes alone.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Optional

import jax
import jax.numpy as jnp
import numpy as np
import flax.linen as nn
from jax.ad_checkpoint import checkpoint_name

from sft_jax.models.layers.attention import attention_mask, dot_product_attention
from sft_jax.models.layers.common import (check_compute_settings, chunked_nll, config_from_fields, constrain,
                                          embed_lookup, layer_stack, mask_padded_vocab, padded_vocab, param,
                                          project)
from sft_jax.models.layers.kv_cache import advance, decode_inputs, empty_cache, write_layer

Array = jax.Array

# model_type -> the transformers class that loads it
MODEL_TYPES = {"llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM", "mistral": "MistralForCausalLM"}
ROPE_TYPES = ("default", "linear", "llama3")

# name: (documented parameter count, fields that differ from LlamaConfig's defaults = Llama 3.2 1B).
# The counts are the model cards' (tied embeddings counted once), checked by the tests within 1%.
_LLAMA3_ROPE = dict(rope_theta=500000.0, rope_type="llama3", rope_low_freq_factor=1.0, rope_high_freq_factor=4.0,
                    rope_original_max_position_embeddings=8192)
_QWEN2 = dict(model_type="qwen2", vocab_size=151936, rope_theta=1000000.0, rope_type="default", rms_norm_eps=1e-6,
              attention_bias=True, bos_token_id=151643, eos_token_id=151643)
PRESETS: dict[str, tuple[float, dict]] = {
    "llama3.2-1b": (1.23e9, {}),
    "llama3.2-3b": (3.21e9, dict(hidden_size=3072, intermediate_size=8192, num_hidden_layers=28,
                                 num_attention_heads=24, num_key_value_heads=8, head_dim=128)),
    "llama3.1-8b": (8.03e9, dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                                 num_attention_heads=32, num_key_value_heads=8, head_dim=128,
                                 rope_factor=8.0, tie_word_embeddings=False, **_LLAMA3_ROPE)),
    "qwen2.5-0.5b": (0.49e9, dict(_QWEN2, hidden_size=896, intermediate_size=4864, num_hidden_layers=24,
                                  num_attention_heads=14, num_key_value_heads=2, head_dim=64,
                                  max_position_embeddings=32768)),
    "qwen2.5-1.5b": (1.54e9, dict(_QWEN2, hidden_size=1536, intermediate_size=8960, num_hidden_layers=28,
                                  num_attention_heads=12, num_key_value_heads=2, head_dim=128,
                                  max_position_embeddings=131072)),
    "qwen2.5-7b": (7.62e9, dict(_QWEN2, vocab_size=152064, hidden_size=3584, intermediate_size=18944,
                                num_hidden_layers=28, num_attention_heads=28, num_key_value_heads=4, head_dim=128,
                                max_position_embeddings=131072, tie_word_embeddings=False)),
    # Mistral-7B-v0.3: v0.1's 4096-token sliding window is gone, the vocab grew to 32768
    "mistral-7b": (7.25e9, dict(model_type="mistral", vocab_size=32768, hidden_size=4096, intermediate_size=14336,
                                num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=8, head_dim=128,
                                rope_theta=1000000.0, rope_type="default", max_position_embeddings=32768,
                                tie_word_embeddings=False, bos_token_id=1, eos_token_id=2)),
    # tiny sizes for tests and the CPU demo (vocab is usually overridden by the tokenizer's).
    # llama_demo trains from scratch on rows of 128 tokens: plain rotary at theta 10^4 (Llama 3's
    # 5 * 10^5 with llama3 scaling leaves most dimension pairs nearly still over 128 positions),
    # and init std 0.04 (HF's 0.02 makes a width-128 model learn the demo tasks about half as fast:
    # held-out exact match 0.55 after the demo's 400 steps, 0.895 at 0.04; docs/models.md).
    "llama_demo": (4.82e6, dict(vocab_size=32000, bos_token_id=1, eos_token_id=2, hidden_size=128,
                                intermediate_size=344, num_hidden_layers=4, num_attention_heads=4,
                                num_key_value_heads=2, head_dim=32, max_position_embeddings=2048,
                                rope_theta=10000.0, rope_type="default", initializer_range=0.04)),
    "llama_tiny": (0.355e6, dict(vocab_size=4096, bos_token_id=1, eos_token_id=2, hidden_size=64, intermediate_size=176, num_hidden_layers=2,
                               num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                               max_position_embeddings=1024, rope_original_max_position_embeddings=128)),
}


@dataclasses.dataclass(frozen=True)
class LlamaConfig:
    """Architecture plus how to run it; the single source of truth for the model.
    The defaults are Llama 3.2 1B."""

    model_type: str = "llama"  # llama | qwen2 | mistral: which HF class the weights belong to
    vocab_size: int = 128256  # real tokens; embeddings have padded_vocab_size rows
    hidden_size: int = 2048  # D
    intermediate_size: int = 8192  # F
    num_hidden_layers: int = 16  # L
    num_attention_heads: int = 32  # H
    num_key_value_heads: int = 8  # G; each kv head serves H / G query heads
    head_dim: Optional[int] = None  # K; None: filled in as hidden_size // num_attention_heads (HF's rule)
    rms_norm_eps: float = 1e-5
    max_position_embeddings: int = 131072  # the longest sequence the model was trained for
    # Rotary embeddings. Fields a rope type does not use are reset to these defaults.
    rope_theta: float = 500000.0
    rope_type: str = "llama3"  # one of ROPE_TYPES
    rope_factor: float = 32.0  # linear, llama3: how much the context was stretched
    rope_low_freq_factor: float = 1.0  # llama3
    rope_high_freq_factor: float = 4.0  # llama3
    rope_original_max_position_embeddings: int = 8192  # llama3: the pre-stretch context
    tie_word_embeddings: bool = True  # the LM head reuses embed_tokens (no lm_head parameter)
    attention_bias: bool = False  # biases on q/k/v (Qwen2; Llama checkpoints with attention_bias)
    attention_out_bias: bool = False  # a bias on o_proj (only Llama's attention_bias has one)
    use_sliding_window: bool = False  # whether sliding_window applies (Qwen2's flag; Mistral: a window given)
    sliding_window: Optional[int] = None  # keys a query sees, itself included; None when not used
    initializer_range: float = 0.02  # HF's init std
    bos_token_id: Optional[int] = 128000
    eos_token_id: Optional[int] = 128001
    extra_eos_token_ids: tuple[int, ...] = ()  # HF configs may list several eos ids; the first is eos_token_id
    pad_token_id: Optional[int] = None
    # How to compute (not part of the checkpoint's identity):
    dtype: str = "float32"  # compute dtype: float32 for parity, bfloat16 for training
    remat: str = "none"  # none | full | save_dots | offload
    scan_layers: bool = True  # False unrolls the layer loop (same parameters, same numbers)
    attention: str = "auto"  # one of ATTENTION_IMPLS (sft_jax.models.layers.attention.resolve_attention)
    max_segments_per_row: int = 0  # static M for cudnn_packed; 0 = sequence length // 16

    def __post_init__(self):
        def fill(name, value):  # frozen: normalise through object.__setattr__
            object.__setattr__(self, name, value)

        if self.model_type not in MODEL_TYPES:
            raise ValueError(f"model_type={self.model_type!r}: choose one of {sorted(MODEL_TYPES)}")
        if self.head_dim is None:
            if self.hidden_size % self.num_attention_heads:
                raise ValueError(f"hidden_size={self.hidden_size} is not divisible by "
                                 f"num_attention_heads={self.num_attention_heads}; give head_dim")
            fill("head_dim", self.hidden_size // self.num_attention_heads)
        if self.head_dim % 2:
            raise ValueError(f"head_dim={self.head_dim} must be even (rotary pairs dim i with i + K/2)")
        if not 1 <= self.num_key_value_heads <= self.num_attention_heads or \
                self.num_attention_heads % self.num_key_value_heads:
            raise ValueError(f"num_key_value_heads={self.num_key_value_heads} must divide "
                             f"num_attention_heads={self.num_attention_heads}")
        if self.rope_type not in ROPE_TYPES:
            raise ValueError(f"rope type {self.rope_type!r} is not supported; supported: {', '.join(ROPE_TYPES)}")
        defaults = {f.name: f.default for f in dataclasses.fields(self)}
        used = {"default": (), "linear": ("rope_factor",),
                "llama3": ("rope_factor", "rope_low_freq_factor", "rope_high_freq_factor",
                           "rope_original_max_position_embeddings")}[self.rope_type]
        for name in ("rope_factor", "rope_low_freq_factor", "rope_high_freq_factor",
                     "rope_original_max_position_embeddings"):
            if name not in used:  # so equal models compare equal (and round-trip through HF configs)
                fill(name, defaults[name])
        if self.rope_type == "llama3" and not self.rope_low_freq_factor < self.rope_high_freq_factor:
            raise ValueError(f"llama3 rope needs low_freq_factor < high_freq_factor, got "
                             f"{self.rope_low_freq_factor} and {self.rope_high_freq_factor}")
        fill("extra_eos_token_ids", tuple(int(i) for i in self.extra_eos_token_ids))
        # what the HF class can express
        if self.model_type == "qwen2" and (not self.attention_bias or self.attention_out_bias):
            raise ValueError("qwen2 has q/k/v biases and no o_proj bias: attention_bias=True, attention_out_bias=False")
        if self.model_type == "mistral" and (self.attention_bias or self.attention_out_bias):
            raise ValueError("mistral has no attention biases")
        if self.model_type == "llama" and self.attention_bias != self.attention_out_bias:
            raise ValueError("llama's attention_bias covers q/k/v and o_proj alike: set both or neither")
        if self.model_type == "llama" and self.use_sliding_window:
            raise ValueError("llama has no sliding window")
        if not self.use_sliding_window:
            fill("sliding_window", None)  # an unused window is dropped, as HF's Qwen2 config does
        elif self.sliding_window is None or self.sliding_window < 1:
            raise ValueError(f"use_sliding_window=True needs sliding_window >= 1, got {self.sliding_window}")
        check_compute_settings(self)

    # --- derived numbers ---------------------------------------------------
    @property
    def padded_vocab_size(self) -> int:
        return padded_vocab(self.vocab_size)

    @property
    def compute_dtype(self):
        return jnp.dtype(self.dtype)

    @property
    def rope_scaling(self) -> Optional[dict]:
        """HF's ``rope_scaling`` dict (None for plain rotary)."""
        if self.rope_type == "default":
            return None
        if self.rope_type == "linear":
            return {"rope_type": "linear", "factor": self.rope_factor}
        return {"rope_type": "llama3", "factor": self.rope_factor, "low_freq_factor": self.rope_low_freq_factor,
                "high_freq_factor": self.rope_high_freq_factor,
                "original_max_position_embeddings": self.rope_original_max_position_embeddings}

    def num_params(self, include_vocab_padding: bool = False) -> int:
        """Parameter count; without padding rows it equals HF's ``num_parameters()``."""
        D, F, L, H, G, K = (self.hidden_size, self.intermediate_size, self.num_hidden_layers,
                            self.num_attention_heads, self.num_key_value_heads, self.head_dim)
        V = self.padded_vocab_size if include_vocab_padding else self.vocab_size
        attn = D * H * K + 2 * D * G * K + H * K * D
        attn += (H * K + 2 * G * K) * self.attention_bias + D * self.attention_out_bias
        per_layer = 2 * D + attn + 3 * D * F
        heads = 1 if self.tie_word_embeddings else 2  # embed_tokens (+ lm_head)
        return heads * V * D + L * per_layer + D

    def flops_per_token(self, seq_len: int, training: bool = True) -> float:
        """Model FLOPs per token: 6N (fwd+bwd matmuls; N without the untied input embedding,
        a lookup) plus attention 12 * L * H * K * T (QK^T and AV, fwd+bwd, causal mask not
        discounted), PaLM appendix B convention as GPT-2's. Forward only is a third of it."""
        n = self.num_params() - (0 if self.tie_word_embeddings else self.vocab_size * self.hidden_size)
        flops = 6 * n + self.attention_flops_per_token(seq_len)
        return flops if training else flops / 3

    def attention_flops_per_token(self, seq_len: int) -> int:
        """The attention part of ``flops_per_token`` (training): 12 * L * H * K * T."""
        return 12 * self.num_hidden_layers * self.num_attention_heads * self.head_dim * seq_len

    def activations_per_token(self, remat: str) -> int:
        """Activation elements kept per token and layer for the backward pass under ``remat``
        (attention scores aside), counted as GPT-2's: without remat the two norm inputs 2D, q/k/v
        (H + 2G)K, attention output HK, o_proj output D, gate, up, silu(gate) and their product 4F,
        down_proj output D; save_dots keeps the matmul outputs plus the norm inputs; full remat
        the block's input D. Not yet compared with XLA's temp bytes."""
        D, F, H, G, K = (self.hidden_size, self.intermediate_size, self.num_attention_heads,
                         self.num_key_value_heads, self.head_dim)
        dots = (H + 2 * G) * K + D + 2 * F + D
        return {"none": 2 * D + (H + 2 * G) * K + H * K + D + 4 * F + D, "save_dots": 2 * D + dots, "full": D}[remat]

    # --- presets and HF conversion -----------------------------------------
    @classmethod
    def preset(cls, name: str, **overrides) -> "LlamaConfig":
        if name not in PRESETS:
            raise ValueError(f"unknown model preset {name!r}; choose one of {sorted(PRESETS)}")
        return cls(**{**PRESETS[name][1], **overrides})

    def replace(self, **changes) -> "LlamaConfig":
        return dataclasses.replace(self, **changes)

    @classmethod
    def from_hf_config(cls, hf: Any, **overrides) -> "LlamaConfig":
        """From a transformers Llama/Qwen2/Mistral config or its ``config.json`` dict (the
        ``rope_theta`` + ``rope_scaling`` keys of older files or ``rope_parameters`` of newer)."""
        d = hf if isinstance(hf, dict) else hf.to_dict()
        model_type = d.get("model_type")
        if model_type not in MODEL_TYPES:
            raise ValueError(f"config model_type is {model_type!r}, expected one of {sorted(MODEL_TYPES)}")
        if d.get("hidden_act", "silu") != "silu":
            raise ValueError(f"hidden_act={d['hidden_act']!r} is not supported (SwiGLU with silu only)")
        if d.get("mlp_bias"):
            raise ValueError("mlp_bias=true is not supported")
        rope = dict(d.get("rope_scaling") or d.get("rope_parameters") or {})
        rope_type = rope.get("rope_type", rope.get("type", "default"))
        if rope_type not in ROPE_TYPES:
            raise ValueError(f"rope_scaling type {rope_type!r} is not supported; supported: {', '.join(ROPE_TYPES)}")
        if rope.get("partial_rotary_factor", d.get("partial_rotary_factor", 1.0)) != 1.0:
            raise ValueError("partial_rotary_factor != 1 is not supported")
        heads = d["num_attention_heads"]
        max_positions = d.get("max_position_embeddings", 2048)
        fields = dict(
            model_type=model_type,
            vocab_size=d["vocab_size"],
            hidden_size=d["hidden_size"],
            intermediate_size=d["intermediate_size"],
            num_hidden_layers=d["num_hidden_layers"],
            num_attention_heads=heads,
            num_key_value_heads=d.get("num_key_value_heads") or heads,
            head_dim=d.get("head_dim") or d["hidden_size"] // heads,
            rms_norm_eps=d.get("rms_norm_eps", 1e-6),
            max_position_embeddings=max_positions,
            rope_theta=float(rope.get("rope_theta", d.get("rope_theta", 10000.0))),
            rope_type=rope_type,
            tie_word_embeddings=bool(d.get("tie_word_embeddings", False)),
            initializer_range=d.get("initializer_range", 0.02),
            pad_token_id=d.get("pad_token_id"),
        )
        if rope_type in ("linear", "llama3"):
            fields["rope_factor"] = float(rope["factor"])
        if rope_type == "llama3":
            fields.update(rope_low_freq_factor=float(rope["low_freq_factor"]),
                          rope_high_freq_factor=float(rope["high_freq_factor"]),
                          rope_original_max_position_embeddings=int(
                              rope.get("original_max_position_embeddings", max_positions)))
        if model_type == "llama":
            fields.update(attention_bias=bool(d.get("attention_bias", False)),
                          attention_out_bias=bool(d.get("attention_bias", False)))
        elif model_type == "qwen2":
            fields.update(attention_bias=True, attention_out_bias=False,
                          use_sliding_window=bool(d.get("use_sliding_window", False)),
                          sliding_window=d.get("sliding_window"))
        else:
            fields.update(sliding_window=d.get("sliding_window"), use_sliding_window=d.get("sliding_window") is not None)
        eos = d.get("eos_token_id")
        eos = list(eos) if isinstance(eos, (list, tuple)) else [eos]
        fields.update(bos_token_id=d.get("bos_token_id"), eos_token_id=eos[0], extra_eos_token_ids=tuple(eos[1:]))
        fields.update(overrides)
        return cls(**fields)

    def to_hf_config(self) -> dict:
        """A ``config.json`` dict that transformers reads as this model_type's config. Rotary
        settings are written both ways (``rope_theta`` + ``rope_scaling`` for older readers,
        ``rope_parameters`` for newer)."""
        eos = [self.eos_token_id, *self.extra_eos_token_ids] if self.extra_eos_token_ids else self.eos_token_id
        d = {
            "architectures": [MODEL_TYPES[self.model_type]],
            "model_type": self.model_type,
            "vocab_size": self.vocab_size,
            "hidden_size": self.hidden_size,
            "intermediate_size": self.intermediate_size,
            "num_hidden_layers": self.num_hidden_layers,
            "num_attention_heads": self.num_attention_heads,
            "num_key_value_heads": self.num_key_value_heads,
            "head_dim": self.head_dim,
            "hidden_act": "silu",
            "max_position_embeddings": self.max_position_embeddings,
            "rms_norm_eps": self.rms_norm_eps,
            "rope_theta": self.rope_theta,
            "rope_scaling": self.rope_scaling,
            "rope_parameters": {"rope_theta": self.rope_theta, **(self.rope_scaling or {"rope_type": "default"})},
            "tie_word_embeddings": self.tie_word_embeddings,
            "initializer_range": self.initializer_range,
            "attention_dropout": 0.0,
            "bos_token_id": self.bos_token_id,
            "eos_token_id": eos,
            "pad_token_id": self.pad_token_id,
            "use_cache": True,
            "torch_dtype": "float32",
        }
        if self.model_type == "llama":
            d.update(attention_bias=self.attention_bias, mlp_bias=False, pretraining_tp=1)
        elif self.model_type == "qwen2":
            # HF windows layers >= max_window_layers; 0 windows all of them, the reading used here
            d.update(use_sliding_window=self.use_sliding_window, sliding_window=self.sliding_window,
                     max_window_layers=0 if self.use_sliding_window else self.num_hidden_layers)
        else:
            d.update(sliding_window=self.sliding_window)
        return d

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "LlamaConfig":
        return config_from_fields(cls, d)


# --- layers -----------------------------------------------------------------

def _vocab_init(std: float, vocab_size: int):
    """Normal rows for real tokens, zero rows for the vocab padding (which no export keeps)."""
    normal = nn.initializers.normal(std)

    def init(key, shape, dtype=jnp.float32):
        real = jnp.arange(shape[0])[:, None] < vocab_size
        return jnp.where(real, normal(key, shape, dtype), jnp.zeros((), dtype))

    return init


class RMSNorm(nn.Module):
    """RMSNorm computed in float32; cast back to the compute dtype, then scaled (HF's order)."""

    config: LlamaConfig

    @nn.compact
    def __call__(self, x: Array) -> Array:
        cfg = self.config
        scale = param(self, "scale", nn.initializers.ones, (cfg.hidden_size,), ("norm",))
        x32 = x.astype(jnp.float32)
        y = x32 * jax.lax.rsqrt(jnp.mean(jnp.square(x32), axis=-1, keepdims=True) + cfg.rms_norm_eps)
        return y.astype(cfg.compute_dtype) * scale.astype(cfg.compute_dtype)


def rope_inv_freq(cfg: LlamaConfig) -> np.ndarray:
    """Rotation speed of each of the K/2 dimension pairs, (K/2,) float32, after rope scaling.

    Computed in float32 step by step as transformers does (the weights were trained with those
    float32 frequencies): one ulp here moves the angle at position 1e3 by ~1e-4 rad."""
    f32 = np.float32
    K = cfg.head_dim
    inv_freq = f32(1.0) / f32(cfg.rope_theta) ** (np.arange(0, K, 2).astype(f32) / f32(K))
    if cfg.rope_type == "linear":  # positions squeezed by factor: the same as slower rotation
        inv_freq = inv_freq / f32(cfg.rope_factor)
    elif cfg.rope_type == "llama3":
        # Long wavelengths (past the pre-stretch context / low_freq_factor) slow down by factor,
        # short ones (under context / high_freq_factor) stay, the band between blends the two.
        context, factor = f32(cfg.rope_original_max_position_embeddings), f32(cfg.rope_factor)
        low, high = f32(cfg.rope_low_freq_factor), f32(cfg.rope_high_freq_factor)
        wavelen = f32(2 * math.pi) / inv_freq
        smooth = (context / wavelen - low) / (high - low)
        blended = (f32(1) - smooth) * inv_freq / factor + smooth * inv_freq
        inv_freq = np.where(wavelen > context / low, inv_freq / factor,
                            np.where(wavelen < context / high, inv_freq, blended))
    return inv_freq.astype(f32)


def rotary_tables(positions: Array, cfg: LlamaConfig) -> tuple[Array, Array]:
    """cos and sin of every rotation angle, each (B,T,K) in the compute dtype.

    HF's half-split layout: dimension i and i + K/2 form a pair that turns at frequency i, so
    the (K/2,) angles are laid out twice side by side. Angles are float32 (positions reach 1e5).
    """
    angles = positions.astype(jnp.float32)[..., None] * jnp.asarray(rope_inv_freq(cfg))  # (B,T,K/2)
    angles = jnp.concatenate([angles, angles], axis=-1)  # (B,T,K)
    return jnp.cos(angles).astype(cfg.compute_dtype), jnp.sin(angles).astype(cfg.compute_dtype)


def apply_rotary(x: Array, cos: Array, sin: Array) -> Array:
    """Rotate each (i, i + K/2) pair of x (B,T,N,K) by its angle: x cos + rotate_half(x) sin."""
    x1, x2 = jnp.split(x, 2, axis=-1)
    rotated = jnp.concatenate([-x2, x1], axis=-1)  # HF's rotate_half
    return x * cos[:, :, None] + rotated * sin[:, :, None]


class Attention(nn.Module):
    """Grouped-query attention: H query heads share G key/value heads, H/G each."""

    config: LlamaConfig

    @nn.compact
    def __call__(self, x: Array, rope: tuple, mask: tuple, kv_cache: Optional[dict], cache_index: Array | None):
        """``rope`` is (cos, sin) (B,T,K); ``mask`` is (the (B,1,T,S) mask, the (B,T) segment ids or
        None when decoding)."""
        cfg = self.config
        mask, segment_ids = mask
        D, H, G, K = cfg.hidden_size, cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
        init = nn.initializers.normal(cfg.initializer_range)
        dt = cfg.compute_dtype
        w_q = param(self, "q_proj_kernel", init, (D, H, K), ("embed", "heads", "head_dim"))
        w_k = param(self, "k_proj_kernel", init, (D, G, K), ("embed", "kv_heads", "head_dim"))
        w_v = param(self, "v_proj_kernel", init, (D, G, K), ("embed", "kv_heads", "head_dim"))
        w_o = param(self, "o_proj_kernel", init, (H, K, D), ("heads", "head_dim", "embed"))

        q = project(self, "q_proj_kernel", "BTD,DHK->BTHK", x, w_q, dt)
        k = project(self, "k_proj_kernel", "BTD,DGK->BTGK", x, w_k, dt)
        v = project(self, "v_proj_kernel", "BTD,DGK->BTGK", x, w_v, dt)
        if cfg.attention_bias:
            zeros = nn.initializers.zeros
            q = q + param(self, "q_proj_bias", zeros, (H, K), ("heads", "head_dim")).astype(dt)
            k = k + param(self, "k_proj_bias", zeros, (G, K), ("kv_heads", "head_dim")).astype(dt)
            v = v + param(self, "v_proj_bias", zeros, (G, K), ("kv_heads", "head_dim")).astype(dt)
        q = constrain(q, ("batch", "length", "heads", "head_dim"))
        cos, sin = rope
        q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)  # the cache holds rotated keys, as HF's

        new_cache = None
        if kv_cache is not None:  # decoding: write this chunk into the cache, attend over all of it
            k, v, new_cache = write_layer(kv_cache, k, v, cache_index)  # (B,S,G,K)
            k, v = k.astype(dt), v.astype(dt)
        # (B,S,G,K) -> (B,S,H,K): kv head j serves query heads j*H/G .. (j+1)*H/G - 1 (HF's repeat_kv).
        # Repeated, every attention path sees plain multi-head inputs; a tensor split of both head
        # axes keeps each query head beside its kv head.
        k = constrain(jnp.repeat(k, H // G, axis=2), ("batch", "length", "heads", "head_dim"))
        v = constrain(jnp.repeat(v, H // G, axis=2), ("batch", "length", "heads", "head_dim"))
        out = dot_product_attention(q, k, v, mask, cfg.attention, segment_ids,
                                    max_segments=cfg.max_segments_per_row)  # (B,T,H,K)
        out = checkpoint_name(out, "attention_out")
        y = project(self, "o_proj_kernel", "BTHK,HKD->BTD", out, w_o, dt)
        if cfg.attention_out_bias:
            y = y + param(self, "o_proj_bias", nn.initializers.zeros, (D,), ("embed",)).astype(dt)
        return y, new_cache


class MLP(nn.Module):
    """SwiGLU: down(silu(gate(x)) * up(x))."""

    config: LlamaConfig

    @nn.compact
    def __call__(self, x: Array) -> Array:
        cfg = self.config
        D, F = cfg.hidden_size, cfg.intermediate_size
        init = nn.initializers.normal(cfg.initializer_range)
        dt = cfg.compute_dtype
        w_gate = param(self, "gate_proj_kernel", init, (D, F), ("embed", "mlp"))
        w_up = param(self, "up_proj_kernel", init, (D, F), ("embed", "mlp"))
        w_down = param(self, "down_proj_kernel", init, (F, D), ("mlp", "embed"))
        gate = project(self, "gate_proj_kernel", "BTD,DF->BTF", x, w_gate, dt)
        up = project(self, "up_proj_kernel", "BTD,DF->BTF", x, w_up, dt)
        h = constrain(jax.nn.silu(gate) * up, ("batch", "length", "mlp"))
        h = checkpoint_name(h, "mlp_hidden")
        return project(self, "down_proj_kernel", "BTF,FD->BTD", h, w_down, dt)


class DecoderLayer(nn.Module):
    """Pre-RMSNorm block; scan-shaped: (carry, per-layer input) -> (carry, out)."""

    config: LlamaConfig

    @nn.compact
    def __call__(self, x: Array, kv_cache: Optional[dict], mask: tuple, rope: tuple, cache_index: Array | None):
        cfg = self.config
        h = RMSNorm(cfg, name="input_layernorm")(x)
        a, new_cache = Attention(cfg, name="self_attn")(h, rope, mask, kv_cache, cache_index)
        x = x + a
        x = x + MLP(cfg, name="mlp")(RMSNorm(cfg, name="post_attention_layernorm")(x))
        x = constrain(x, ("batch", "length", "embed"))
        return x, new_cache


class Llama(nn.Module):
    """Llama-family LM. Returns logits over the padded vocab (padding logits are -inf), or the
    final hidden states with ``return_hidden=True`` so the loss can chunk the vocab matmul."""

    config: LlamaConfig

    def setup(self):
        cfg = self.config
        vocab_init = _vocab_init(cfg.initializer_range, cfg.vocab_size)
        table_shape = (cfg.padded_vocab_size, cfg.hidden_size)
        self.embed_tokens = param(self, "embed_tokens", vocab_init, table_shape, ("vocab", "embed"))
        if not cfg.tie_word_embeddings:
            self.lm_head = param(self, "lm_head", vocab_init, table_shape, ("vocab", "embed"))
        self.layers = layer_stack(DecoderLayer, cfg, name="layers",
                                  in_axes=(0, nn.broadcast, nn.broadcast, nn.broadcast))
        self.norm = RMSNorm(cfg, name="norm")

    def __call__(self, tokens: Array, positions: Array, segment_ids: Array, *,
                 cache: Optional[dict] = None, return_hidden: bool = False):
        """tokens/positions/segment_ids (B,T) int32; segment 0 = padding, documents 1, 2, ...

        With ``cache`` (from ``init_cache``) the T tokens are written at ``cache['index']`` and
        attend to everything cached in their segment; returns (logits, new_cache).
        """
        cfg = self.config
        dt = cfg.compute_dtype
        S = tokens.shape[1] if cache is None else cache["segment_ids"].shape[1]
        if cfg.sliding_window is not None and S > cfg.sliding_window:
            raise ValueError(f"{S} keys exceed sliding_window={cfg.sliding_window}; only windows that cover "
                             f"the whole sequence (full attention) are implemented")
        x = embed_lookup(self.embed_tokens, tokens, "vocab").astype(dt)  # (B,T,D)
        x = constrain(x, ("batch", "length", "embed"))
        rope = rotary_tables(positions, cfg)
        if cache is None:
            mask = (attention_mask(segment_ids, segment_ids), segment_ids)  # fused paths read the ids
            layer_caches, index = None, None
        else:
            decode_mask, kv_segments, layer_caches, index = decode_inputs(cache, segment_ids)
            mask = (decode_mask, None)
        x, new_layer_caches = self.layers(x, layer_caches, mask, rope, index)
        x = self.norm(x)
        out = x if return_hidden else self.logits(x)
        if cache is None:
            return out
        return out, advance(new_layer_caches, kv_segments, index, tokens.shape[1])

    def logits(self, hidden: Array) -> Array:
        """(B,T,D) -> (B,T,V) float32 through lm_head or the tied embed_tokens."""
        table = self.embed_tokens if self.config.tie_word_embeddings else self.lm_head
        return _head_logits(table, hidden, self.config)


# --- head, cache, parameters ------------------------------------------------------

def head_table(params, cfg: LlamaConfig) -> Array:
    """The LM head's (V,D) table from a parameter tree (with or without the "params" level)."""
    inner = params["params"] if "params" in params else params
    return inner["embed_tokens"] if cfg.tie_word_embeddings else inner["lm_head"]


def _head_logits(table: Array, hidden: Array, cfg: LlamaConfig) -> Array:
    logits = jnp.einsum("BTD,VD->BTV", hidden, table.astype(hidden.dtype), preferred_element_type=jnp.float32)
    return mask_padded_vocab(logits, cfg.vocab_size)


def lm_logits(params, hidden: Array, cfg: LlamaConfig) -> Array:
    """(B,T,D) final hidden states -> (B,T,V) float32 logits, padded vocab rows -inf."""
    return _head_logits(head_table(params, cfg), hidden, cfg)


def token_nll(params, hidden: Array, targets: Array, cfg: LlamaConfig, chunk: int = 0) -> Array:
    """Per-token negative log-likelihood, (B,T) float32, from final hidden states through the LM
    head; ``chunk`` > 0 recomputes the logits chunk by chunk (``layers.common.chunked_nll``)."""
    table = head_table(params, cfg)
    return chunked_nll(lambda h: _head_logits(table, h, cfg), hidden, targets, chunk)


def init_cache(cfg: LlamaConfig, batch: int, max_len: int, dtype=None) -> dict:
    """Empty KV cache: k/v (L,B,S,G,K) (kv heads only, rotated keys), segment ids (B,S) all
    padding, write index 0."""
    return empty_cache(cfg.num_hidden_layers, batch, max_len, cfg.num_key_value_heads, cfg.head_dim,
                       dtype or cfg.compute_dtype)


def param_shapes(cfg: LlamaConfig):
    """Abstract (shape-only) parameters with their logical-axis boxes; allocates nothing."""
    model = Llama(cfg)
    dummy = jnp.zeros((1, 1), jnp.int32)
    return jax.eval_shape(lambda: model.init(jax.random.key(0), dummy, dummy, dummy + 1))


def init_params(cfg: LlamaConfig, rng: Array):
    """Unboxed float32 parameters with HF's initialisation (vocab padding rows zero)."""
    model = Llama(cfg)
    dummy = jnp.zeros((1, 1), jnp.int32)
    return nn.unbox(model.init(rng, dummy, dummy, dummy + 1))
