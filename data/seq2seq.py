"""Sequence-to-sequence batches with teacher forcing, and synthetic tasks to learn.

A pair (source, target) becomes
  source         the source ids, padded            [B, S]
  source_mask    1 on real source tokens            [B, S]
  decoder_inputs [BOS] + target, padded             [B, T]   (the target shifted right)
  targets        target + [EOS], padded             [B, T]
  target_mask    1 where a target token is predicted [B, T]
Synthetic tasks need the whole source to produce any of the target: 'reverse' (the
source backwards) and 'sort' (the source in ascending order).
"""
import dataclasses

import numpy as np

from lmlab.data.errors import DataError
from lmlab.data.files import read_lines

SYNTHETIC_TASKS = {'reverse': lambda ids: ids[::-1], 'sort': np.sort}


@dataclasses.dataclass(frozen=True)
class Seq2SeqSpecials:
  pad: int
  bos: int
  eos: int


def synthetic_pairs(task: str, count: int, *, seed: int, first_id: int, n_symbols: int,
                    min_len: int = 8, max_len: int = 16):
  """`count` (source, target) pairs of random symbols first_id .. first_id + n_symbols - 1."""
  if task not in SYNTHETIC_TASKS:
    raise DataError(f'unknown synthetic task {task!r}; choose one of '
                    f'{", ".join(SYNTHETIC_TASKS)}')
  rng = np.random.default_rng([seed, count])
  pairs = []
  for length in rng.integers(min_len, max_len + 1, count):
    source = rng.integers(first_id, first_id + n_symbols, length)
    pairs.append((source, SYNTHETIC_TASKS[task](source)))
  return pairs


def seq2seq_batch(pairs, specials: Seq2SeqSpecials, *, source_len: int, target_len: int):
  """The teacher-forcing batch of `pairs`; longer sources or targets are an error."""
  b = len(pairs)
  out = {'source': np.full((b, source_len), specials.pad, np.int32),
         'source_mask': np.zeros((b, source_len), np.int32),
         'decoder_inputs': np.full((b, target_len), specials.pad, np.int32),
         'targets': np.full((b, target_len), specials.pad, np.int32),
         'target_mask': np.zeros((b, target_len), np.int32)}
  for row, (source, target) in enumerate(pairs):
    if len(source) > source_len or len(target) + 1 > target_len:
      raise DataError(f'a pair of lengths ({len(source)}, {len(target)}) does not fit '
                      f'source_len={source_len}, target_len={target_len} (target + [EOS])')
    n = len(target) + 1
    out['source'][row, :len(source)] = source
    out['source_mask'][row, :len(source)] = 1
    out['decoder_inputs'][row, :n] = np.concatenate([[specials.bos], target])
    out['targets'][row, :n] = np.concatenate([target, [specials.eos]])
    out['target_mask'][row, :n] = 1
  return out


def sample_batch(pairs, specials: Seq2SeqSpecials, *, seed: int, step: int, batch_size: int,
                 source_len: int, target_len: int):
  """A batch of pairs drawn from (seed, step)."""
  indices = np.random.default_rng([seed, step]).integers(0, len(pairs), batch_size)
  return seq2seq_batch([pairs[i] for i in indices], specials, source_len=source_len,
                       target_len=target_len)


def read_pairs_tsv(path: str, encode):
  """(source ids, target ids) from `source<TAB>target` lines, encoded with `encode(text)`."""
  pairs = []
  for number, line in enumerate(read_lines(path), 1):
    if not line:
      continue
    if line.count('\t') != 1:
      raise DataError(f'{path}:{number}: expected one tab between source and target')
    source, target = line.split('\t')
    pairs.append((np.asarray(encode(source)), np.asarray(encode(target))))
  if not pairs:
    raise DataError(f'{path} holds no source<TAB>target pairs')
  return pairs
