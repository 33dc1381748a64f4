"""Process plumbing: jax.distributed set-up, the run lock, local and remote (gs://) paths."""
