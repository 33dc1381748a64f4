"""Inference on a trained model: KV-cache sampling and reward-model scoring."""
