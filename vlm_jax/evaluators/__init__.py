"""Evaluation metrics and evaluators, shared by `vlm-jax eval` and periodic evaluation in training."""
