"""Ways of training, each only what differs from the others: the batch, the loss, what to
evaluate and how to export (``base.Objective``). Everything else is ``sft_jax.core``."""
