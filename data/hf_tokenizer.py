"""Hugging Face byte-level BPE tokenizers (GPT-2, Qwen2, LLaMA-3) as tiktoken Encodings.

A byte-level `tokenizer.json` spells every token in GPT-2's printable stand-ins for bytes;
undoing that gives tiktoken's ranks over raw bytes, with each token's vocabulary id as its
rank. That reproduces the Hugging Face tokenizer when the ids follow the merge order, which
the conversion checks. tiktoken does not normalise text: for a tokenizer with Qwen2's NFC
normaliser, pass NFC text (`unicodedata.normalize('NFC', text)`) to get the same ids.
"""
import json
import os

import regex
import tiktoken

from lmlab.data.errors import DataError
from lmlab.data.bpe import PATTERNS, build_encoding

_SUPPORTED_NORMALIZERS = (None, 'NFC')


def _byte_of_stand_in() -> dict[str, int]:
  """GPT-2's byte alphabet inverted: each byte's printable stand-in character -> the byte."""
  printable = [*range(ord('!'), ord('~') + 1), *range(ord('¡'), ord('¬') + 1),
               *range(ord('®'), ord('ÿ') + 1)]
  unprintable = [b for b in range(256) if b not in printable]
  stand_ins = {b: chr(b) for b in printable}
  stand_ins.update({b: chr(256 + i) for i, b in enumerate(unprintable)})
  return {character: b for b, character in stand_ins.items()}


_BYTE_OF_STAND_IN = _byte_of_stand_in()


def _unsupported(path: str, what: str):
  return DataError(f'{path}: {what} is unsupported; pass the tokenizer.json of a byte-level '
                   'BPE model (GPT-2, Qwen2 or LLaMA-3 style)')


def _read_json(path: str) -> dict:
  if not os.path.isfile(path):
    raise DataError(f'no tokenizer file at {path}; pass the path of a tokenizer.json')
  try:
    with open(path, encoding='utf-8') as f:
      return json.load(f)
  except ValueError as error:
    raise DataError(f'{path} is not valid JSON ({error}); pass a tokenizer.json') from None


def _pattern(path: str, pre_tokenizer) -> str:
  """The pre-tokenisation regex: a Split step's, else the GPT-2 regex of ByteLevel."""
  if pre_tokenizer is None:
    raise _unsupported(path, 'a tokenizer without a ByteLevel pre_tokenizer')
  steps = (pre_tokenizer.get('pretokenizers', []) if pre_tokenizer.get('type') == 'Sequence'
           else [pre_tokenizer])
  kinds = [step.get('type') for step in steps]
  if kinds not in (['ByteLevel'], ['Split', 'ByteLevel']):
    raise _unsupported(path, f'the pre_tokenizer steps {kinds}')
  byte_level = steps[-1]
  if byte_level.get('add_prefix_space'):
    raise _unsupported(path, 'ByteLevel add_prefix_space=true')
  if len(steps) == 1:
    if not byte_level.get('use_regex', True):
      raise _unsupported(path, 'ByteLevel with use_regex=false and no Split')
    return PATTERNS['gpt2']
  split = steps[0]
  if byte_level.get('use_regex', True):
    raise _unsupported(path, 'a Split followed by a ByteLevel that splits again (use_regex)')
  if ('Regex' not in split.get('pattern', {}) or split.get('behavior') != 'Isolated'
      or split.get('invert')):
    raise _unsupported(path, f'the Split {split}, other than an isolating regex')
  pattern = split['pattern']['Regex']
  # Oniguruma, the regex engine of `tokenizers`, reads x{1,3}+ as (?:x{1,3})+, while
  # tiktoken reads it as a possessive x{1,3}: the two would split text differently.
  if regex.search(r'(?<!\\)\{\d+(?:,\d*)?\}\+', pattern):
    raise _unsupported(path, f'the Split regex {pattern!r} with a {{m,n}}+ repetition,')
  return pattern


def _token_bytes(path: str, token: str) -> bytes:
  try:
    return bytes(_BYTE_OF_STAND_IN[character] for character in token)
  except KeyError:
    raise _unsupported(path, f'vocabulary entry {token!r}, outside the byte-level '
                       'alphabet,') from None


def _check_merge_order(path: str, vocab: dict[str, int], merges):
  """tiktoken merges by token rank, so the ids merges make must not go down."""
  previous_id = -1
  for index, merge in enumerate(merges):
    left, right = merge.split(' ', 1) if isinstance(merge, str) else merge
    merged_id = vocab.get(left + right)
    if merged_id is None:
      raise DataError(f'{path}: merge {index} ({left!r}, {right!r}) makes a token that is not '
                      'in model.vocab; pass a complete tokenizer.json')
    if merged_id < previous_id:
      raise _unsupported(path, f'merge {index} ({left!r}, {right!r}), whose token id '
                         f'{merged_id} is below the previous merge\'s {previous_id} (ids '
                         'not in merge order),')
    previous_id = merged_id


def ranks_from_tokenizer_json(path: str):
  """(ranks, pattern, special_tokens) of a byte-level BPE `tokenizer.json`."""
  config = _read_json(path)
  model = config.get('model') or {}
  if model.get('type') != 'BPE':
    raise _unsupported(path, f'model type {model.get("type")!r}')
  if model.get('byte_fallback'):
    raise _unsupported(path, 'byte_fallback (a SentencePiece-style, not byte-level, BPE)')
  for affix in ('continuing_subword_prefix', 'end_of_word_suffix'):
    if model.get(affix):
      raise _unsupported(path, f'{affix}={model[affix]!r}')
  normalizer = (config.get('normalizer') or {}).get('type')
  if normalizer not in _SUPPORTED_NORMALIZERS:
    raise _unsupported(path, f'normalizer {normalizer!r}')
  if not isinstance(model.get('vocab'), dict):
    raise DataError(f'{path} has no model.vocab; pass a complete tokenizer.json')
  pattern = _pattern(path, config.get('pre_tokenizer'))
  special_tokens = {added['content']: added['id'] for added in config.get('added_tokens', [])}
  special_ids = set(special_tokens.values())
  ranks = {_token_bytes(path, token): token_id for token, token_id in model['vocab'].items()
           if token_id not in special_ids}
  missing = 256 - sum(len(token) == 1 for token in ranks)
  if missing:
    raise _unsupported(path, f'a vocabulary without {missing} of the 256 single bytes')
  _check_merge_order(path, model['vocab'], model.get('merges', []))
  return ranks, pattern, special_tokens


def encoding_from_tokenizer_json(path: str, name: str | None = None) -> tiktoken.Encoding:
  """The tiktoken Encoding of a `tokenizer.json`, named after its folder unless `name`."""
  ranks, pattern, special_tokens = ranks_from_tokenizer_json(path)
  name = name or os.path.basename(os.path.dirname(os.path.abspath(path)))
  return build_encoding(name, ranks, pattern=pattern, special_tokens=special_tokens,
                        source=path)
