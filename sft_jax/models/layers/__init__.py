"""Layers every family shares: ``attention`` (the mask and the kernel dispatch), ``common``
(parameters, LayerNorm, embedding lookup, remat, the scanned layer stack, the loss head's
helpers) and ``kv_cache`` (decoding)."""
