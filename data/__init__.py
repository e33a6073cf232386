"""Text, tokenizers, token caches and batches. Imports nothing else of ours."""


class DataError(ValueError):
  """Unusable data or tokenizer input; the message says what to pass instead."""
