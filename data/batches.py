"""Batches of next-token windows, each a pure function of (seed, step).

Nothing depends on how many batches came before, so a resumed run sees exactly the
batches an uninterrupted one would. A batch is a dict of int32 [B, T] arrays: 'inputs'
and 'targets', and with an end-of-text id given, 'segment_ids' and 'positions' of the
packed documents, so attention can stop at document boundaries.
"""
import numpy as np

from lmlab.data.errors import DataError


def check_length(tokens, seq_len: int, split: str):
  if len(tokens) < seq_len + 1:
    raise DataError(f'the {split} split has {len(tokens)} tokens, fewer than seq_len+1='
                    f'{seq_len + 1}; use more data or a smaller --seq_len')


def document_segments(inputs_bt, end_token: int):
  """(segment_ids, positions) [B, T] of packed documents.

  A document ends with its end-of-text token; the token after it starts a new segment,
  whose positions count from 0 again.
  """
  is_end = inputs_bt == end_token
  segment_ids = np.concatenate([np.zeros_like(is_end[:, :1], np.int32),
                                np.cumsum(is_end[:, :-1], axis=1, dtype=np.int32)], axis=1)
  index = np.broadcast_to(np.arange(inputs_bt.shape[1], dtype=np.int32), inputs_bt.shape)
  starts_here = np.concatenate([np.ones_like(is_end[:, :1]), is_end[:, :-1]], axis=1)
  segment_start = np.maximum.accumulate(np.where(starts_here, index, 0), axis=1)
  return segment_ids, index - segment_start


def _windows(tokens, starts, seq_len: int, end_token):
  rows = np.stack([np.asarray(tokens[s:s + seq_len + 1]) for s in starts]).astype(np.int32)
  batch = {'inputs': rows[:, :-1], 'targets': rows[:, 1:]}
  if end_token is not None:
    batch['segment_ids'], batch['positions'] = document_segments(batch['inputs'], end_token)
  return batch


def train_batch(tokens, *, seed: int, step: int, batch_size: int, seq_len: int,
                end_token=None):
  """A batch of windows at random offsets drawn from (seed, step)."""
  rng = np.random.default_rng([seed, step])
  starts = rng.integers(0, len(tokens) - seq_len, size=batch_size)
  return _windows(tokens, starts, seq_len, end_token)


def eval_batches(tokens, *, batch_size: int, seq_len: int, max_batches: int, end_token=None):
  """Yields batches of evenly spaced, non-overlapping windows of the split."""
  n_windows = min((len(tokens) - 1) // seq_len, batch_size * max_batches)
  n_windows -= n_windows % batch_size
  if n_windows == 0:
    # Fewer windows than one batch: a single batch of overlapping windows still measures.
    starts = np.linspace(0, len(tokens) - seq_len - 1, batch_size).astype(np.int64)
    yield _windows(tokens, starts, seq_len, end_token)
    return
  # Spread over the whole split; n_windows <= (len - 1) // seq_len keeps stride >= seq_len.
  stride = (len(tokens) - 1 - seq_len) // max(n_windows - 1, 1)
  starts = np.arange(n_windows) * stride
  for i in range(0, n_windows, batch_size):
    yield _windows(tokens, starts[i:i + batch_size], seq_len, end_token)
