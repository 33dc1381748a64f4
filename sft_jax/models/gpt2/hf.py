"""GPT-2's Hugging Face face: where each parameter sits in a ``GPT2LMHeadModel`` checkpoint, and
the classes its exports load as. Reading, writing and verifying are ``sft_jax.models.hf_io``'s.

HF GPT2LMHeadModel quirks, all handled here:
 * Conv1D stores weights as (in, out), the same orientation as our kernels: reshape, never transpose.
 * c_attn is one (D, 3D) matrix with q|k|v side by side; we view it as (D, 3, H, K).
 * lm_head.weight is tied to wte (often absent from the file); it is never read or written.
 * attn.bias / attn.masked_bias are causal-mask buffers in old checkpoints, not weights: ignored.
 * GPT2Model checkpoints lack the "transformer." key prefix.
 * Our wte has padded_vocab_size rows: padding rows are zero on import and trimmed on export.
 * Per-layer tensors h.{i}.* are stacked on a leading L axis (scanned layers).
"""

from __future__ import annotations

import re

from sft_jax.models.hf_io import KeyMap

CAUSAL_LM_CLASS = "GPT2LMHeadModel"
# The reward model: the trunk plus a bias-free scalar head; HF keeps it as score.weight (1, D), a
# Linear's (out, in) layout, the transpose of our (D, 1) kernel.
REWARD_CLASS = "GPT2ForSequenceClassification"
SCORE_KEY = "score.weight"

# Shapes are written in axis letters (D embed, H heads, K head dim, F = 4D, V vocab, P positions);
# "3D" means 3 * D. Each HF axis maps onto one or more consecutive axes of ours.
#   HF key (after "transformer.")   our path                  HF shape    our shape (per layer)
GLOBAL_LAYOUT = (
    ("wte.weight",                  "wte",                    "V,D",      "V,D"),
    ("wpe.weight",                  "wpe",                    "P,D",      "P,D"),
    ("ln_f.weight",                 "ln_f/scale",             "D",        "D"),
    ("ln_f.bias",                   "ln_f/bias",              "D",        "D"),
)
LAYER_LAYOUT = (  # HF key h.{i}.<suffix>, ours h/<path> with a leading L axis
    ("ln_1.weight",                 "ln_1/scale",             "D",        "D"),
    ("ln_1.bias",                   "ln_1/bias",              "D",        "D"),
    ("attn.c_attn.weight",          "attn/c_attn_kernel",     "D,3D",     "D,3,H,K"),
    ("attn.c_attn.bias",            "attn/c_attn_bias",       "3D",       "3,H,K"),
    ("attn.c_proj.weight",          "attn/c_proj_kernel",     "D,D",      "H,K,D"),
    ("attn.c_proj.bias",            "attn/c_proj_bias",       "D",        "D"),
    ("ln_2.weight",                 "ln_2/scale",             "D",        "D"),
    ("ln_2.bias",                   "ln_2/bias",              "D",        "D"),
    ("mlp.c_fc.weight",             "mlp/c_fc_kernel",        "D,F",      "D,F"),
    ("mlp.c_fc.bias",               "mlp/c_fc_bias",          "F",        "F"),
    ("mlp.c_proj.weight",           "mlp/c_proj_kernel",      "F,D",      "F,D"),
    ("mlp.c_proj.bias",             "mlp/c_proj_bias",        "D",        "D"),
)
IGNORED_KEYS = re.compile(r"^(lm_head\.weight|h\.\d+\.attn\.(bias|masked_bias))$")


def axis_sizes(cfg) -> dict[str, int]:
    return {"D": cfg.n_embd, "H": cfg.n_head, "K": cfg.head_dim, "F": 4 * cfg.n_embd,
            "V": cfg.vocab_size, "P": cfg.n_positions}


KEY_MAP = KeyMap(prefix="transformer.", global_layout=GLOBAL_LAYOUT, layer_layout=LAYER_LAYOUT,
                 layer_key="h.{i}.", stack="h", sizes=axis_sizes, ignored=IGNORED_KEYS, vocab_axes=(("wte", 0),))
