"""GPT-2 in Flax (Linen), read top to bottom: config, layers, block, model, loss head.

Axis letters used in shapes and einsums:
  B batch, T query length, S key length, D embed, H heads, K head dim,
  F mlp, V (padded) vocab, L layers, P positions.

Every parameter carries logical axis names (``vocab``, ``embed``, ``heads``,
``head_dim``, ``mlp``, ``layers``, ...). The model never names devices: the
trainer maps logical names to mesh axes with one rules table
(``sft_jax.core.mesh.LOGICAL_RULES``). Parameters live in float32; compute runs
in ``config.dtype``. What every family shares (attention kernels, LayerNorm, the
layer scan, the KV cache, the chunked loss) is in ``sft_jax.models.layers``.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, ClassVar, Optional

import jax
import jax.numpy as jnp
import flax.linen as nn
from jax.ad_checkpoint import checkpoint_name

from sft_jax.models.layers.attention import attention_mask, dot_product_attention
from sft_jax.models.layers.common import (LayerNorm, check_compute_settings, chunked_nll, config_from_fields,
                                          constrain, embed_lookup, layer_stack, mask_padded_vocab, padded_vocab,
                                          param, project)
from sft_jax.models.layers.kv_cache import advance, decode_inputs, empty_cache, write_layer

Array = jax.Array

PRESETS = {
    # name: (n_layer, n_head, n_embd)
    "gpt2": (12, 12, 768),
    "gpt2-medium": (24, 16, 1024),
    "gpt2-large": (36, 20, 1280),
    "gpt2-xl": (48, 25, 1600),
    # tiny sizes for tests and the CPU demo
    "tiny": (2, 4, 64),
    "demo": (4, 4, 128),
}


@dataclasses.dataclass(frozen=True)
class GPT2Config:
    """Architecture plus how to run it; the single source of truth for the model."""

    model_type: ClassVar[str] = "gpt2"  # HF config.json's model_type
    # transformers' common names for GPT-2's fields (its GPT2Config.attribute_map): code shared by
    # every family reads these; replace() and preset() accept them as well.
    attribute_map: ClassVar[dict[str, str]] = {"hidden_size": "n_embd", "num_hidden_layers": "n_layer",
                                               "num_attention_heads": "n_head",
                                               "max_position_embeddings": "n_positions"}

    vocab_size: int = 50257  # real tokens; the embedding has padded_vocab_size rows
    n_positions: int = 1024  # learned positions, so also the max sequence length
    n_embd: int = 768  # D
    n_layer: int = 12  # L
    n_head: int = 12  # H; head dim K = D / H
    layer_norm_epsilon: float = 1e-5  # HF's default
    initializer_range: float = 0.02  # HF's init std
    bos_token_id: int = 50256
    eos_token_id: int = 50256
    # How to compute (not part of the checkpoint's identity):
    dtype: str = "float32"  # compute dtype: float32 for parity, bfloat16 for training
    remat: str = "none"  # none | full | save_dots | offload
    scan_layers: bool = True  # False unrolls the layer loop (same parameters, same numbers)
    attention: str = "auto"  # one of ATTENTION_IMPLS; auto: see resolve_attention
    max_segments_per_row: int = 0  # static M for cudnn_packed; 0 = sequence length // 16 (data's default)

    def __post_init__(self):
        if self.n_embd % self.n_head:
            raise ValueError(f"n_embd={self.n_embd} is not divisible by n_head={self.n_head}")
        check_compute_settings(self)

    # --- derived numbers ---------------------------------------------------
    @property
    def hidden_size(self) -> int:
        return self.n_embd

    @property
    def num_hidden_layers(self) -> int:
        return self.n_layer

    @property
    def num_attention_heads(self) -> int:
        return self.n_head

    @property
    def num_key_value_heads(self) -> int:
        return self.n_head

    @property
    def max_position_embeddings(self) -> int:
        return self.n_positions

    @property
    def head_dim(self) -> int:
        return self.n_embd // self.n_head

    @property
    def padded_vocab_size(self) -> int:
        return padded_vocab(self.vocab_size)

    @property
    def compute_dtype(self):
        return jnp.dtype(self.dtype)

    def num_params(self, include_vocab_padding: bool = False) -> int:
        """Parameter count; without padding rows it equals HF's ``num_parameters()``."""
        D, L, P = self.n_embd, self.n_layer, self.n_positions
        V = self.padded_vocab_size if include_vocab_padding else self.vocab_size
        per_layer = (2 * D) + (D * 3 * D + 3 * D) + (D * D + D) + (2 * D) + (D * 4 * D + 4 * D) + (4 * D * D + D)
        return V * D + P * D + L * per_layer + 2 * D

    def flops_per_token(self, seq_len: int, training: bool = True) -> float:
        """Model FLOPs per token: 6N (fwd+bwd matmuls, N without position embeddings)
        plus attention 12 * L * D * T (QK^T and AV, fwd+bwd, causal mask not discounted),
        PaLM appendix B convention. Forward only is a third of it."""
        n = self.num_params() - self.n_positions * self.n_embd
        flops = 6 * n + self.attention_flops_per_token(seq_len)
        return flops if training else flops / 3

    def attention_flops_per_token(self, seq_len: int) -> int:
        """The attention part of ``flops_per_token`` (training): 12 * L * D * T."""
        return 12 * self.n_layer * self.n_embd * seq_len

    def activations_per_token(self, remat: str) -> int:
        """Activation elements kept per token and layer for the backward pass under ``remat``
        (attention scores aside), at the compute dtype. Without remat: layer norms 2, qkv 3,
        attention output 1, projection 1, MLP in/act/out 4+4+1 = 16 D (Korthikanti et al. 2022
        count 34 s b h bytes with dropout masks; GPT-2 here has none); save_dots keeps 11 D,
        full remat the block's input D."""
        return {"none": 16, "save_dots": 11, "full": 1}[remat] * self.n_embd

    # --- presets and HF conversion -----------------------------------------
    @classmethod
    def preset(cls, name: str, **overrides) -> "GPT2Config":
        if name not in PRESETS:
            raise ValueError(f"unknown model preset {name!r}; choose one of {sorted(PRESETS)}")
        n_layer, n_head, n_embd = PRESETS[name]
        return cls(n_layer=n_layer, n_head=n_head, n_embd=n_embd, **cls._field_names(overrides))

    def replace(self, **changes) -> "GPT2Config":
        return dataclasses.replace(self, **self._field_names(changes))

    @classmethod
    def _field_names(cls, values: dict) -> dict:
        """``values`` with HF's common names (``attribute_map``) turned into our field names."""
        return {cls.attribute_map.get(k, k): v for k, v in values.items()}

    @classmethod
    def from_hf_config(cls, hf: Any, **overrides) -> "GPT2Config":
        """From a transformers ``GPT2Config`` or its ``config.json`` dict."""
        d = hf if isinstance(hf, dict) else hf.to_dict()
        model_type = d.get("model_type")
        if model_type != "gpt2":
            raise ValueError(f"config model_type is {model_type!r}, expected 'gpt2'")
        if d.get("n_inner") not in (None, 4 * d["n_embd"]):
            raise ValueError(f"n_inner={d['n_inner']} is not supported (GPT-2 uses 4 * n_embd)")
        if d.get("activation_function", "gelu_new") not in ("gelu_new", "gelu_pytorch_tanh"):
            raise ValueError(f"activation_function={d['activation_function']!r} is not supported (tanh GELU only)")
        if d.get("scale_attn_by_inverse_layer_idx") or d.get("reorder_and_upcast_attn"):
            raise ValueError("scale_attn_by_inverse_layer_idx / reorder_and_upcast_attn are not supported")
        if d.get("tie_word_embeddings") is False:
            raise ValueError("tie_word_embeddings=false (an untied lm_head) is not supported")
        eos = d.get("eos_token_id", 50256)
        bos = d.get("bos_token_id", eos)
        fields = dict(
            vocab_size=d["vocab_size"],
            n_positions=d["n_positions"],
            n_embd=d["n_embd"],
            n_layer=d["n_layer"],
            n_head=d["n_head"],
            layer_norm_epsilon=d.get("layer_norm_epsilon", 1e-5),
            initializer_range=d.get("initializer_range", 0.02),
            bos_token_id=bos if bos is not None else 50256,
            eos_token_id=eos if eos is not None else 50256,
        )
        fields.update(cls._field_names(overrides))
        return cls(**fields)

    def to_hf_config(self) -> dict:
        """A ``config.json`` dict that transformers reads as ``GPT2Config``."""
        return {
            "architectures": ["GPT2LMHeadModel"],
            "model_type": "gpt2",
            "vocab_size": self.vocab_size,
            "n_positions": self.n_positions,
            "n_ctx": self.n_positions,
            "n_embd": self.n_embd,
            "n_layer": self.n_layer,
            "n_head": self.n_head,
            "n_inner": None,
            "activation_function": "gelu_new",
            "resid_pdrop": 0.0,
            "embd_pdrop": 0.0,
            "attn_pdrop": 0.0,
            "layer_norm_epsilon": self.layer_norm_epsilon,
            "initializer_range": self.initializer_range,
            "bos_token_id": self.bos_token_id,
            "eos_token_id": self.eos_token_id,
            "pad_token_id": self.eos_token_id,
            "tie_word_embeddings": True,
            "scale_attn_weights": True,
            "use_cache": True,
            "torch_dtype": "float32",
        }

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "GPT2Config":
        return config_from_fields(cls, d)


# --- layers -----------------------------------------------------------------

def layer_norm(cfg: GPT2Config, name: str) -> LayerNorm:
    return LayerNorm(cfg.n_embd, cfg.layer_norm_epsilon, cfg.compute_dtype, name=name)


class Attention(nn.Module):
    config: GPT2Config

    @nn.compact
    def __call__(self, x: Array, mask: tuple, kv_cache: Optional[dict], cache_index: Array | None):
        """``mask`` is (the (B,1,T,S) mask, the (B,T) segment ids or None when decoding)."""
        cfg = self.config
        mask, segment_ids = mask
        D, H, K = cfg.n_embd, cfg.n_head, cfg.head_dim
        std = cfg.initializer_range
        dt = cfg.compute_dtype
        # HF's c_attn is one (D, 3D) matrix with q|k|v side by side; we keep it whole but
        # name its heads so the tensor axis can split them.
        w_qkv = param(self, "c_attn_kernel", nn.initializers.normal(std), (D, 3, H, K), ("embed", "qkv", "heads", "head_dim"))
        b_qkv = param(self, "c_attn_bias", nn.initializers.zeros, (3, H, K), ("qkv", "heads", "head_dim"))
        # GPT-2 scales the residual projections' init by 1/sqrt(2L).
        w_out = param(self, "c_proj_kernel", nn.initializers.normal(std / math.sqrt(2 * cfg.n_layer)), (H, K, D), ("heads", "head_dim", "embed"))
        b_out = param(self, "c_proj_bias", nn.initializers.zeros, (D,), ("embed",))

        qkv = project(self, "c_attn_kernel", "BTD,DCHK->CBTHK", x, w_qkv, dt) + b_qkv.astype(dt)[:, None, None]
        q, k, v = (constrain(t, ("batch", "length", "heads", "head_dim")) for t in qkv)  # each (B,T,H,K)
        new_cache = None
        if kv_cache is not None:  # decoding: write this chunk into the cache, attend over all of it
            k, v, new_cache = write_layer(kv_cache, k, v, cache_index)
            k, v = k.astype(dt), v.astype(dt)
        out = dot_product_attention(q, k, v, mask, cfg.attention, segment_ids,
                                    max_segments=cfg.max_segments_per_row)  # (B,T,H,K)
        out = checkpoint_name(out, "attention_out")
        y = project(self, "c_proj_kernel", "BTHK,HKD->BTD", out, w_out, dt) + b_out.astype(dt)
        return y, new_cache


class MLP(nn.Module):
    config: GPT2Config

    @nn.compact
    def __call__(self, x: Array) -> Array:
        cfg = self.config
        D, F = cfg.n_embd, 4 * cfg.n_embd
        std = cfg.initializer_range
        dt = cfg.compute_dtype
        w_fc = param(self, "c_fc_kernel", nn.initializers.normal(std), (D, F), ("embed", "mlp"))
        b_fc = param(self, "c_fc_bias", nn.initializers.zeros, (F,), ("mlp",))
        w_proj = param(self, "c_proj_kernel", nn.initializers.normal(std / math.sqrt(2 * cfg.n_layer)), (F, D), ("mlp", "embed"))
        b_proj = param(self, "c_proj_bias", nn.initializers.zeros, (D,), ("embed",))
        h = project(self, "c_fc_kernel", "BTD,DF->BTF", x, w_fc, dt) + b_fc.astype(dt)
        h = constrain(h, ("batch", "length", "mlp"))
        h = checkpoint_name(h, "mlp_hidden")
        h = jax.nn.gelu(h, approximate=True)  # GPT-2's tanh GELU ("gelu_new")
        return project(self, "c_proj_kernel", "BTF,FD->BTD", h, w_proj, dt) + b_proj.astype(dt)


class Block(nn.Module):
    """Pre-LayerNorm transformer block; scan-shaped: (carry, per-layer input) -> (carry, out)."""

    config: GPT2Config

    @nn.compact
    def __call__(self, x: Array, kv_cache: Optional[dict], mask: tuple, cache_index: Array | None):
        cfg = self.config
        a, new_cache = Attention(cfg, name="attn")(layer_norm(cfg, "ln_1")(x), mask, kv_cache, cache_index)
        x = x + a
        x = x + MLP(cfg, name="mlp")(layer_norm(cfg, "ln_2")(x))
        x = constrain(x, ("batch", "length", "embed"))
        return x, new_cache


class GPT2(nn.Module):
    """GPT-2 LM. Returns logits over the padded vocab (padding logits are -inf), or the
    final hidden states with ``return_hidden=True`` so the loss can chunk the vocab matmul."""

    config: GPT2Config

    def setup(self):
        cfg = self.config
        std = cfg.initializer_range
        self.wte = self.param("wte", nn.with_logical_partitioning(nn.initializers.normal(std), ("vocab", "embed")),
                              (cfg.padded_vocab_size, cfg.n_embd), jnp.float32)
        self.wpe = self.param("wpe", nn.with_logical_partitioning(nn.initializers.normal(std), ("positions", "embed")),
                              (cfg.n_positions, cfg.n_embd), jnp.float32)
        self.h = layer_stack(Block, cfg, name="h", in_axes=(0, nn.broadcast, nn.broadcast))
        self.ln_f = layer_norm(cfg, "ln_f")

    def __call__(self, tokens: Array, positions: Array, segment_ids: Array, *,
                 cache: Optional[dict] = None, return_hidden: bool = False):
        """tokens/positions/segment_ids (B,T) int32; segment 0 = padding, documents 1, 2, ...

        With ``cache`` (from ``init_cache``) the T tokens are written at ``cache['index']`` and
        attend to everything cached in their segment; returns (logits, new_cache).
        """
        cfg = self.config
        dt = cfg.compute_dtype
        x = embed_lookup(self.wte, tokens, "vocab") + embed_lookup(self.wpe, positions, "positions")  # (B,T,D)
        x = constrain(x.astype(dt), ("batch", "length", "embed"))
        if cache is None:
            mask = (attention_mask(segment_ids, segment_ids), segment_ids)  # fused paths read the ids
            layer_caches, index = None, None
        else:
            decode_mask, kv_segments, layer_caches, index = decode_inputs(cache, segment_ids)
            mask = (decode_mask, None)
        x, new_layer_caches = self.h(x, layer_caches, mask, index)
        x = self.ln_f(x)
        out = x if return_hidden else self.logits(x)
        if cache is None:
            return out
        return out, advance(new_layer_caches, kv_segments, index, tokens.shape[1])

    def logits(self, hidden: Array) -> Array:
        """Tied LM head: (B,T,D) -> (B,T,V) in float32, padded vocab rows masked to -inf."""
        return lm_logits(self.wte, hidden, self.config)


def lm_logits(wte: Array, hidden: Array, cfg: GPT2Config) -> Array:
    logits = jnp.einsum("BTD,VD->BTV", hidden, wte.astype(hidden.dtype), preferred_element_type=jnp.float32)
    return mask_padded_vocab(logits, cfg.vocab_size)


def init_cache(cfg: GPT2Config, batch: int, max_len: int, dtype=None) -> dict:
    """Empty KV cache: k/v (L,B,S,H,K), segment ids (B,S) all padding, write index 0."""
    return empty_cache(cfg.n_layer, batch, max_len, cfg.n_head, cfg.head_dim, dtype or cfg.compute_dtype)


def token_nll(wte: Array, hidden: Array, targets: Array, cfg: GPT2Config, chunk: int = 0) -> Array:
    """Per-token negative log-likelihood, (B,T) float32, from final hidden states through the
    tied head; ``chunk`` > 0 recomputes the logits chunk by chunk (``layers.common.chunked_nll``)."""
    return chunked_nll(lambda h: lm_logits(wte, h, cfg), hidden, targets, chunk)


def param_shapes(cfg: GPT2Config):
    """Abstract (shape-only) parameters with their logical-axis boxes; allocates nothing."""
    model = GPT2(cfg)
    dummy = jnp.zeros((1, 1), jnp.int32)
    return jax.eval_shape(lambda: model.init(jax.random.key(0), dummy, dummy, dummy + 1))


def init_params(cfg: GPT2Config, rng: Array):
    """Unboxed float32 parameters with HF's initialisation."""
    model = GPT2(cfg)
    dummy = jnp.zeros((1, 1), jnp.int32)
    return nn.unbox(model.init(rng, dummy, dummy, dummy + 1))
