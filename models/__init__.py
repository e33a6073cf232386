"""Flax NNX models, their configs and presets."""


class ConfigError(ValueError):
  """A config that cannot describe a model; the message says which field and why."""
