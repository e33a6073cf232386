"""The error of unusable data or tokenizer input."""


class DataError(ValueError):
  """Unusable data or tokenizer input; the message says what to pass instead."""
