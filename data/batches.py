"""Batches of next-token windows, each a pure function of (seed, step).

Nothing depends on how many batches came before, so a resumed run sees exactly the
batches an uninterrupted one would.
"""
import numpy as np

from data import DataError


def check_length(tokens, seq_len: int, split: str):
  if len(tokens) < seq_len + 1:
    raise DataError(f'the {split} split has {len(tokens)} tokens, fewer than seq_len+1='
                    f'{seq_len + 1}; use more data or a smaller --seq_len')


def _windows(tokens, starts, seq_len: int):
  rows = np.stack([np.asarray(tokens[s:s + seq_len + 1]) for s in starts]).astype(np.int32)
  return rows[:, :-1], rows[:, 1:]


def train_batch(tokens, *, seed: int, step: int, batch_size: int, seq_len: int):
  """(inputs, targets), int32 [batch_size, seq_len], at random offsets drawn from (seed, step)."""
  rng = np.random.default_rng([seed, step])
  starts = rng.integers(0, len(tokens) - seq_len, size=batch_size)
  return _windows(tokens, starts, seq_len)


def eval_batches(tokens, *, batch_size: int, seq_len: int, max_batches: int):
  """Yields (inputs, targets) over evenly spaced, non-overlapping windows of the split."""
  n_windows = min((len(tokens) - 1) // seq_len, batch_size * max_batches)
  n_windows -= n_windows % batch_size
  if n_windows == 0:
    # Fewer windows than one batch: a single batch of overlapping windows still measures.
    starts = np.linspace(0, len(tokens) - seq_len - 1, batch_size).astype(np.int64)
    yield _windows(tokens, starts, seq_len)
    return
  # Spread over the whole split; n_windows <= (len - 1) // seq_len keeps stride >= seq_len.
  stride = (len(tokens) - 1 - seq_len) // max(n_windows - 1, 1)
  starts = np.arange(n_windows) * stride
  for i in range(0, n_windows, batch_size):
    yield _windows(tokens, starts[i:i + batch_size], seq_len)
