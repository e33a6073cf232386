"""Flax NNX models, their configs and presets."""
