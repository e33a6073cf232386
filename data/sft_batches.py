"""Batches of packed chat conversations for supervised fine-tuning.

A conversation of N tokens (`chat.EncodedConversation`) makes N - 1 predictions: inputs its
tokens but the last, targets its tokens but the first, and loss_mask its loss mask on the
targets. Whole conversations are packed into rows of seq_len predictions, each its own segment
(segment_ids 0, 1, ... along the row) with positions from 0, so attention stays inside it and
no target crosses into the next. The rest of a row is padding: one more segment, of token 0,
with loss_mask 0. A conversation longer than seq_len + 1 tokens is truncated to its first
seq_len + 1, as a model of that context could not see the rest anyway; `count_truncated` says
how many are. A batch is a dict of int32 [B, T] arrays: 'inputs', 'targets', 'loss_mask',
'segment_ids' and 'positions'.
"""
import itertools

import numpy as np

from lmlab.data.errors import DataError

KEYS = ('inputs', 'targets', 'loss_mask', 'segment_ids', 'positions')


def count_truncated(conversations, seq_len: int) -> int:
  """How many conversations a batch of seq_len truncates."""
  return sum(len(conversation.token_ids) > seq_len + 1 for conversation in conversations)


def _predictions(conversation, seq_len: int) -> int:
  return min(len(conversation.token_ids) - 1, seq_len)


def _check_trainable(conversations):
  if not any(len(conversation.token_ids) > 1 for conversation in conversations):
    raise DataError('no conversation has the two tokens or more that a prediction needs')


def _batch(conversations, rows, *, batch_size: int, seq_len: int):
  """The batch of `rows`, each a list of conversation indices; missing rows are padding."""
  batch = {key: np.zeros((batch_size, seq_len), np.int32) for key in KEYS}
  for row, indices in enumerate(rows + [[]] * (batch_size - len(rows))):
    start = 0
    for segment, index in enumerate(indices):
      conversation = conversations[index]
      n = _predictions(conversation, seq_len)
      at = (row, slice(start, start + n))
      batch['inputs'][at] = conversation.token_ids[:n]
      batch['targets'][at] = conversation.token_ids[1:n + 1]
      batch['loss_mask'][at] = conversation.loss_mask[1:n + 1]
      batch['segment_ids'][at] = segment
      batch['positions'][at] = np.arange(n)
      start += n
    batch['segment_ids'][row, start:] = len(indices)
    batch['positions'][row, start:] = np.arange(seq_len - start)
  return batch


def train_batch(conversations, *, seed: int, step: int, batch_size: int, seq_len: int,
                packed: bool = True):
  """A batch of conversations in an order drawn from (seed, step), a pure function of them.

  The order is a random permutation, then another, and so on; each conversation goes into the
  first row with room for it (packed=False: the first empty row), until one fits in no row.
  Over many steps every conversation is seen about equally often; there are no epochs.
  """
  _check_trainable(conversations)
  rng = np.random.default_rng([seed, step])
  order = itertools.chain.from_iterable(
      rng.permutation(len(conversations)) for _ in itertools.count())
  rows, room = [[] for _ in range(batch_size)], [seq_len] * batch_size
  for index in order:
    n = _predictions(conversations[index], seq_len)
    if n < 1:
      continue
    row = next((row for row in range(batch_size)
                if room[row] >= n and (packed or not rows[row])), None)
    if row is None:
      break
    rows[row].append(index)
    room[row] -= n
  return _batch(conversations, rows, batch_size=batch_size, seq_len=seq_len)


def eval_batches(conversations, *, batch_size: int, seq_len: int, packed: bool = True):
  """Yields batches holding every conversation once, in order: each goes into the current row,
  or starts the next when it does not fit (packed=False: always). The last batch's missing
  rows are padding."""
  _check_trainable(conversations)
  rows, room = [[]], seq_len
  for index, conversation in enumerate(conversations):
    n = _predictions(conversation, seq_len)
    if n < 1:
      continue
    if n > room or (not packed and rows[-1]):
      rows.append([])
      room = seq_len
    rows[-1].append(index)
    room -= n
  for first in range(0, len(rows), batch_size):
    yield _batch(conversations, rows[first:first + batch_size], batch_size=batch_size,
                 seq_len=seq_len)
