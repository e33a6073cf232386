"""Hugging Face byte-level BPE tokenizers (GPT-2, Qwen2, LLaMA-3, StarCoder) as tiktoken
Encodings.

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
from lmlab.data.bpe import LARGEST_TOKEN_ID, PATTERNS, build_encoding

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
STAND_IN_OF_BYTE = {b: character for character, b in _BYTE_OF_STAND_IN.items()}


class NotConvertible(DataError):
  """A tokenizer.json that is not a byte-level BPE tiktoken can run (data/tokenizer.py hands
  it to the `tokenizers` library instead)."""


def _unsupported(path: str, what: str):
  return NotConvertible(f'{path}: {what} is unsupported; pass the tokenizer.json of a '
                        'byte-level BPE model (GPT-2, Qwen2 or LLaMA-3 style)')


def _malformed(path: str, what: str):
  return DataError(f'{path}: {what}; pass a complete tokenizer.json')


def _object(path: str, value, where: str) -> dict:
  """value if it is a JSON object, {} if it is absent (null)."""
  if value is None:
    return {}
  if not isinstance(value, dict):
    raise _malformed(path, f'{where} is {value!r:.60}, not an object')
  return value


def _read_json(path: str) -> dict:
  if not os.path.isfile(path):
    raise DataError(f'no tokenizer file at {path}; pass the path of a tokenizer.json')
  try:
    with open(path, encoding='utf-8') as f:
      config = json.load(f)
  except OSError as error:
    raise DataError(f'{path} cannot be read ({error.strerror})') from None
  except (ValueError, RecursionError) as error:
    raise DataError(f'{path} is not valid JSON ({error}); pass a tokenizer.json') from None
  return _object(path, config, 'the file')


def _pattern(path: str, pre_tokenizer) -> str:
  """The pre-tokenisation regex: a Split step's, else the GPT-2 regex of ByteLevel."""
  if pre_tokenizer is None:
    raise _unsupported(path, 'a tokenizer without a ByteLevel pre_tokenizer')
  pre_tokenizer = _object(path, pre_tokenizer, 'pre_tokenizer')
  steps = (pre_tokenizer.get('pretokenizers', []) if pre_tokenizer.get('type') == 'Sequence'
           else [pre_tokenizer])
  if not isinstance(steps, list):
    raise _malformed(path, f'pre_tokenizer.pretokenizers is {steps!r:.60}, not a list')
  steps = [_object(path, step, 'a pre_tokenizer step') for step in steps]
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
  pattern = _object(path, split.get('pattern'), 'the Split pattern').get('Regex')
  if (not isinstance(pattern, str) or split.get('behavior') != 'Isolated'
      or split.get('invert')):
    raise _unsupported(path, f'the Split {split!r:.200}, other than an isolating regex')
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
  if not isinstance(merges, list):
    raise _malformed(path, f'model.merges is {merges!r:.60}, not a list')
  previous_id = -1
  for index, merge in enumerate(merges):
    pair = merge.split(' ', 1) if isinstance(merge, str) else merge
    if not (isinstance(pair, list) and len(pair) == 2 and all(isinstance(p, str) for p in pair)):
      raise _malformed(path, f'merge {index} is {merge!r:.60}, not "left right" or [left, '
                       'right]')
    left, right = pair
    for part in pair:
      if part not in vocab:  # The tokenizers library refuses such a file too.
        raise DataError(f'{path}: merge {index} ({left!r}, {right!r}) joins {part!r}, which is '
                        'not in model.vocab; pass a complete tokenizer.json')
    merged_id = vocab.get(left + right)
    if merged_id is None:
      raise DataError(f'{path}: merge {index} ({left!r}, {right!r}) makes a token that is not '
                      'in model.vocab; pass a complete tokenizer.json')
    if merged_id < previous_id:
      raise _unsupported(path, f'merge {index} ({left!r}, {right!r}), whose token id '
                         f'{merged_id} is below the previous merge\'s {previous_id} (ids '
                         'not in merge order),')
    previous_id = merged_id


def _added_tokens(path: str, added_tokens) -> dict[str, int]:
  """{content: id} of added_tokens, a list of objects (absent: none)."""
  if added_tokens is None:
    return {}
  if not isinstance(added_tokens, list):
    raise _malformed(path, f'added_tokens is {added_tokens!r:.60}, not a list')
  for added in added_tokens:
    if not (isinstance(added, dict) and isinstance(added.get('content'), str)
            and type(added.get('id')) is int):
      raise _malformed(path, f'added token {added!r:.60} has no "content" string and "id" '
                       'integer')
  return {added['content']: added['id'] for added in added_tokens}


def _absent_bytes(path: str, model: dict, special_tokens: dict[str, int]) -> str | int:
  """What the `tokenizers` library does with a byte the vocabulary lacks: leaves it out
  ('drop'), or puts the id of model.unk_token in its place."""
  unknown = model.get('unk_token')
  if unknown is None:
    return 'drop'
  if model.get('fuse_unk'):
    # The library fuses unknown characters within a pre-token, whose bounds tiktoken's ids
    # no longer show.
    raise _unsupported(path, 'a vocabulary without some single bytes with fuse_unk=true')
  unknown_id = special_tokens.get(unknown, model['vocab'].get(unknown))
  if unknown_id is None:
    raise _malformed(path, f'model.unk_token {unknown!r:.60} is neither in model.vocab nor '
                     'an added token')
  return unknown_id


def _conversion(path: str, config: dict | None = None):
  """(ranks, pattern, special_tokens, absent_bytes) of a byte-level BPE `tokenizer.json`
  (config: its contents, when they are not read from path)."""
  config = _read_json(path) if config is None else config
  model = _object(path, config.get('model'), 'model')
  if model.get('type') != 'BPE':
    raise _unsupported(path, f'model type {model.get("type")!r}')
  if model.get('byte_fallback'):
    raise _unsupported(path, 'byte_fallback (a SentencePiece-style, not byte-level, BPE)')
  for affix in ('continuing_subword_prefix', 'end_of_word_suffix'):
    if model.get(affix):
      raise _unsupported(path, f'{affix}={model[affix]!r}')
  normalizer = _object(path, config.get('normalizer'), 'normalizer').get('type')
  if normalizer not in _SUPPORTED_NORMALIZERS:
    raise _unsupported(path, f'normalizer {normalizer!r}')
  if not isinstance(model.get('vocab'), dict):
    raise DataError(f'{path} has no model.vocab; pass a complete tokenizer.json')
  for token, token_id in model['vocab'].items():
    if type(token_id) is not int or not 0 <= token_id <= LARGEST_TOKEN_ID:
      raise _malformed(path, f'model.vocab gives {token!r:.60} the id {token_id!r:.60}, not '
                       f'an integer in 0..{LARGEST_TOKEN_ID}')
  if len(set(model['vocab'].values())) != len(model['vocab']):
    raise _malformed(path, 'model.vocab gives two tokens the same id')
  pattern = _pattern(path, config.get('pre_tokenizer'))
  special_tokens = _added_tokens(path, config.get('added_tokens'))
  special_ids = set(special_tokens.values())
  ranks = {_token_bytes(path, token): token_id for token, token_id in model['vocab'].items()
           if token_id not in special_ids}
  _check_merge_order(path, model['vocab'], model.get('merges') or [])
  absent = 'refuse' if all(bytes([b]) in ranks for b in range(256)) else _absent_bytes(
      path, model, special_tokens)
  return ranks, pattern, special_tokens, absent


def ranks_from_tokenizer_json(path: str):
  """(ranks, pattern, special_tokens) of a byte-level BPE `tokenizer.json`."""
  return _conversion(path)[:3]


def encoding_from_tokenizer_json(path: str, name: str | None = None,
                                 config: dict | None = None) -> tiktoken.Encoding:
  """The tiktoken Encoding of a `tokenizer.json` (or of its contents `config`, which path
  names), named after its folder unless `name`. A vocabulary without some of the 256 single
  bytes (StarCoder-family tokenizers) encodes as bpe.WithAbsentBytes: such a byte is left
  out, as transformers does, or is the unk_token."""
  ranks, pattern, special_tokens, absent = _conversion(path, config)
  name = name or os.path.basename(os.path.dirname(os.path.abspath(path)))
  return build_encoding(name, ranks, pattern=pattern, special_tokens=special_tokens,
                        source=path, absent_bytes=absent)
