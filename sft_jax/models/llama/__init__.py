"""The Llama architecture family: Llama 2/3, Qwen2/2.5 and Mistral (one model, three HF classes).

``model`` holds the config, the Flax module and its loss head; ``hf`` the Hugging Face key map
(``sft_jax.models.hf_io`` reads and writes the directories). ``FAMILY`` is what the rest of sft_jax sees
(``sft_jax.models.family``).
"""

from sft_jax.models.family import Family
from sft_jax.models.llama import hf
from sft_jax.models.llama.model import (
    MODEL_TYPES,
    PRESETS,
    ROPE_TYPES,
    Llama,
    LlamaConfig,
    init_cache,
    init_params,
    lm_logits,
    param_shapes,
    token_nll,
)

FAMILY = Family(
    name="llama",
    model_types=tuple(MODEL_TYPES),
    config_cls=LlamaConfig,
    presets=tuple(PRESETS),
    module=Llama,
    param_shapes=param_shapes,
    init_params=init_params,
    logits=lm_logits,
    token_nll=token_nll,
    init_cache=init_cache,
    key_map=hf.key_map,
    causal_lm_classes=hf.CAUSAL_LM_CLASSES,
    reward_classes=hf.REWARD_CLASSES,
    score_key=hf.SCORE_KEY,
    arch_fields=("model_type", "vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                 "num_attention_heads", "num_key_value_heads", "head_dim", "tie_word_embeddings", "attention_bias",
                 "attention_out_bias"),
    embedding_names=("embed_tokens", "lm_head"),
    lora_targets=("q_proj", "v_proj"),
)

__all__ = ["FAMILY", "PRESETS", "ROPE_TYPES", "Llama", "LlamaConfig", "init_cache", "init_params", "lm_logits",
           "param_shapes", "token_nll"]
