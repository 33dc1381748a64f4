"""The Llama architecture family: Llama 2/3, Qwen2/2.5 and Mistral (one model, three HF classes).

``model`` holds the config, the Flax module and its loss head; ``hf`` the Hugging Face key map,
safetensors readers and the exporter.
"""

from sft_jax.models.llama.model import (
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

__all__ = ["PRESETS", "ROPE_TYPES", "Llama", "LlamaConfig", "init_cache", "init_params", "lm_logits",
           "param_shapes", "token_nll"]
