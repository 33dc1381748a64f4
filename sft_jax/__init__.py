"""sft_jax: supervised instruction fine-tuning of GPT-2 models in JAX/Flax.

Entry points (thin ``__main__`` modules over this library): ``sft_jax.train``,
``sft_jax.data``, ``sft_jax.convert``, ``sft_jax.generate``, ``sft_jax.bench``.
"""

__version__ = "0.1.0"


def _drop_transformers_torch_notice() -> None:
    """transformers logs "PyTorch was not found..." when it is imported without torch. sft_jax uses
    only its tokenizers and configs (torch only to check exports, when it is installed), so on a
    torch-free install that line tells a user nothing: that record alone is dropped."""
    import logging

    class NoTorchNotice(logging.Filter):
        def filter(self, record: logging.LogRecord) -> bool:
            return not record.getMessage().startswith("PyTorch was not found.")

    logging.getLogger("transformers").addFilter(NoTorchNotice())


_drop_transformers_torch_notice()
