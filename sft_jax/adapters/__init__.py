"""Parameter-efficient adapters (LoRA) shared by every family and objective."""
