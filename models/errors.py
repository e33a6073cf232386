"""The errors of bad model configs and unreadable checkpoints."""


class ConfigError(ValueError):
  """A config that cannot describe a model; the message says which field and why."""


class CheckpointError(ValueError):
  """A checkpoint that cannot be read into, or written from, a model; the message names the
  file, field or tensor at fault."""
