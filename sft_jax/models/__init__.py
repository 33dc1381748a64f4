"""Model families: each folder holds one architecture and its Hugging Face key map."""
