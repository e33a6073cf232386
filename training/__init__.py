"""Optimisation, the train/eval loop, checkpoints and metrics."""
