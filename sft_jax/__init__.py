"""sft_jax: supervised instruction fine-tuning of GPT-2 models in JAX/Flax.

Entry points (thin ``__main__`` modules over this library): ``sft_jax.train``,
``sft_jax.data``, ``sft_jax.convert``, ``sft_jax.generate``, ``sft_jax.bench``.
"""

__version__ = "0.1.0"
