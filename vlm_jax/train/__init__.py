"""Training: the train step and loop, optimizer factory, checkpoints and metrics."""
