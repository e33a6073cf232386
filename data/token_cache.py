"""Tokenised splits on disk: one flat memmapped token file per split, built once.

Documents are joined with the end-of-text token. A cache lives in a folder named by
the corpus fingerprint, so a different corpus or tokenizer never overwrites one.
"""
import json
import os
import sys

import numpy as np

from data import corpus
from data.tokenizer import END_OF_TEXT


def token_dtype(n_vocab: int):
  return np.uint16 if n_vocab <= 2**16 else np.uint32


def _write_split(docs, tokenizer, path: str, dtype) -> tuple[int, int]:
  """Streams documents into `path` one at a time; returns (tokens, files with bad UTF-8)."""
  eot = tokenizer.encode_single_token(END_OF_TEXT)
  n_tokens = n_replaced = 0
  partial = path + '.partial'
  with open(partial, 'wb') as out:
    for doc in docs:
      text, replaced = corpus.read_text(doc)
      n_replaced += replaced
      ids = tokenizer.encode_ordinary(text)
      ids.append(eot)
      np.asarray(ids, dtype).tofile(out)
      n_tokens += len(ids)
  os.replace(partial, path)
  return n_tokens, n_replaced


def load_splits(splits, tokenizer, cache_root: str, *, log=print):
  """{'train': tokens, 'val': tokens} as read-only memmaps, tokenising on first use."""
  key = corpus.fingerprint(splits, extra=f'{tokenizer.name}|{tokenizer.n_vocab}')[:16]
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
  with open(meta_path) as f:
    meta = json.load(f)
  return {name: np.memmap(os.path.join(folder, f'{name}.bin'), dtype=meta['dtype'], mode='r')
          for name in meta['splits']}
