"""GPT-2 (HF ``model_type`` gpt2): ``model`` holds the config, the Flax module and its tied loss
head; ``hf`` the key map of its HF checkpoints and its export classes. ``FAMILY`` is what the
rest of sft_jax sees (``sft_jax.models.family``)."""

from sft_jax.models.family import Family, unwrap
from sft_jax.models.gpt2 import hf
from sft_jax.models.gpt2.model import (PRESETS, GPT2, GPT2Config, init_cache, init_params, lm_logits,
                                       param_shapes, token_nll)


def _logits(params, hidden, cfg: GPT2Config):
    return lm_logits(unwrap(params)["wte"], hidden, cfg)


def _token_nll(params, hidden, targets, cfg: GPT2Config, chunk: int = 0):
    return token_nll(unwrap(params)["wte"], hidden, targets, cfg, chunk)


FAMILY = Family(
    name="gpt2",
    model_types=("gpt2",),
    config_cls=GPT2Config,
    presets=tuple(PRESETS),
    module=GPT2,
    param_shapes=param_shapes,
    init_params=init_params,
    logits=_logits,
    token_nll=_token_nll,
    init_cache=init_cache,
    key_map=lambda cfg: hf.KEY_MAP,
    causal_lm_classes={"gpt2": hf.CAUSAL_LM_CLASS},
    reward_classes={"gpt2": hf.REWARD_CLASS},
    score_key=hf.SCORE_KEY,
    arch_fields=("vocab_size", "n_positions", "n_embd", "n_layer", "n_head"),
    embedding_names=("wte", "wpe"),
    lora_targets=("c_attn",),
)

__all__ = ["FAMILY", "GPT2", "GPT2Config", "PRESETS", "init_cache", "init_params", "lm_logits", "param_shapes",
           "token_nll"]
