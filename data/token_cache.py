"""Tokenised splits on disk: one flat memmapped token file per split, built once.

Documents are joined with the end-of-text token. A cache lives in a folder named by
the corpus fingerprint, so a different corpus or tokenizer never overwrites one.
"""
import json
import os
import sys

import numpy as np
import tqdm

from lmlab.data import corpus
from lmlab.data.errors import DataError
from lmlab.data.tokenizer import separator_id


def token_dtype(n_vocab: int):
  return np.uint16 if n_vocab <= 2**16 else np.uint32


def _encode_many(tokenizer, texts):
  """Encodes texts on every core where the tokenizer can (tiktoken releases the GIL)."""
  if hasattr(tokenizer, 'encode_ordinary_batch'):
    return tokenizer.encode_ordinary_batch(texts, num_threads=os.cpu_count() or 1)
  return [tokenizer.encode_ordinary(t) for t in texts]


def _flag_last(items):
  """Yields (item, whether it is the last one), reading one item ahead."""
  iterator = iter(items)
  previous = next(iterator, None)
  for item in iterator:
    yield previous, False
    previous = item
  if previous is not None:
    yield previous, True


def _write_split(docs, tokenizer, path: str, dtype, *, batch_bytes=1 << 23):
  """Streams documents into `path` a few MB at a time; returns (tokens, files with bad UTF-8)."""
  eot = separator_id(tokenizer)
  n_tokens = 0
  bad_files = set()
  partial = path + '.partial'
  total = sum((os.path.getsize(d.path) if d.end is None else d.end) - d.start for d in docs)
  pending, pending_bytes = [], 0  # (text, ends a document)

  def flush(out):
    nonlocal n_tokens, pending, pending_bytes
    for ids, (_, ends_document) in zip(_encode_many(tokenizer, [t for t, _ in pending]),
                                       pending):
      if ends_document:
        ids.append(eot)
      np.asarray(ids, dtype).tofile(out)
      n_tokens += len(ids)
    pending, pending_bytes = [], 0

  with open(partial, 'wb') as out, tqdm.tqdm(total=total, unit='B', unit_scale=True,
                                             desc=os.path.basename(path), disable=None) as bar:
    for doc in docs:
      for (text, replaced), is_last in _flag_last(corpus.text_chunks(doc)):
        if replaced:
          bad_files.add(doc.path)
        pending.append((text, is_last))
        pending_bytes += len(text)
        bar.update(len(text.encode('utf-8', errors='replace')))
        if pending_bytes >= batch_bytes:
          flush(out)
    flush(out)
  os.replace(partial, path)
  return n_tokens, len(bad_files)


def load_splits(splits, tokenizer, cache_root: str, *, tokenizer_id: str, log=print):
  """{'train': tokens, 'val': tokens} as read-only memmaps, tokenising on first use.

  tokenizer_id identifies what the tokenizer encodes to (data.tokenizer.fingerprint).
  """
  key = corpus.fingerprint(splits, extra=f'{tokenizer_id}|{tokenizer.n_vocab}')[:16]
  folder = os.path.join(cache_root, key)
  meta_path = os.path.join(folder, 'meta.json')
  dtype = token_dtype(tokenizer.n_vocab)
  if not os.path.exists(meta_path):
    os.makedirs(folder, exist_ok=True)
    meta = {'tokenizer': tokenizer.name, 'dtype': np.dtype(dtype).name, 'splits': {}}
    for name, docs in splits.items():
      log(f'tokenising {name} split: {len(docs)} files')
      n_tokens, n_replaced = _write_split(docs, tokenizer, os.path.join(folder, f'{name}.bin'),
                                          dtype)
      if n_replaced:
        print(f'warning: {n_replaced} {name} files had bytes that are not UTF-8; they were '
              'replaced by U+FFFD', file=sys.stderr)
      meta['splits'][name] = {'files': len(docs), 'tokens': n_tokens}
    with open(meta_path + '.partial', 'w') as f:
      json.dump(meta, f, indent=1)
    os.replace(meta_path + '.partial', meta_path)
  return {name: _mapped(os.path.join(folder, f'{name}.bin'), tokens, dtype)
          for name, tokens in _checked_meta(meta_path, tokenizer.name, dtype, splits).items()}


def _mapped(path: str, tokens: int, dtype):
  # numpy cannot map an empty file.
  return np.memmap(path, dtype=dtype, mode='r') if tokens else np.zeros(0, dtype)


def _checked_meta(meta_path: str, tokenizer_name: str, dtype, splits) -> dict:
  """{split: tokens} of a cache's meta.json, checked against the run and the .bin files."""
  folder = os.path.dirname(meta_path)
  remedy = f'; delete {folder} to tokenise the corpus again'
  try:
    with open(meta_path, encoding='utf-8') as f:
      meta = json.load(f)
  except (OSError, ValueError, RecursionError) as error:
    raise DataError(f'{meta_path} is unreadable ({error}){remedy}') from None
  expected = {'tokenizer': tokenizer_name, 'dtype': np.dtype(dtype).name}
  if not (isinstance(meta, dict) and all(meta.get(k) == v for k, v in expected.items())
          and isinstance(meta.get('splits'), dict) and set(splits) <= set(meta['splits'])):
    raise DataError(f'{meta_path} does not describe this cache: expected an object with '
                    f'{expected} and the splits {sorted(splits)}{remedy}')
  tokens = {}
  for name in splits:
    split = meta['splits'][name]
    count = split.get('tokens') if isinstance(split, dict) else None
    path = os.path.join(folder, f'{name}.bin')
    size = os.path.getsize(path) if os.path.isfile(path) else None
    if type(count) is not int or size != count * np.dtype(dtype).itemsize:
      held = 'is missing' if size is None else f'holds {size} bytes'
      raise DataError(f'{path} {held}, not the {count!r:.30} tokens of '
                      f'{np.dtype(dtype).name} that {meta_path} lists{remedy}')
    tokens[name] = count
  return tokens
