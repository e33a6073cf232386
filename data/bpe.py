"""Byte-level BPE vocabularies for tiktoken: training, `.tiktoken` files, a reference encoder.

A vocabulary is tiktoken's `mergeable_ranks`: token bytes -> rank. The 256 single bytes
have ranks 0..255 in byte order; every later token's rank is its merge step, so a lower
rank means an earlier, higher-priority merge. Special tokens are numbered after the ranks.
"""
import base64
import binascii
import collections
import hashlib
import heapq
import json
import os
from collections.abc import Iterable, Sequence

import regex
import tiktoken

from lmlab.data.errors import DataError
from lmlab.data.files import write_new_file

# GPT-2's pre-tokenisation regex.
GPT2_PATTERN = r"""'(?:[sdmt]|ll|ve|re)| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""
# The pre-tokenisation regex of OpenAI's cl100k_base encoding.
CL100K_PATTERN = (r"""'(?i:[sdmt]|ll|ve|re)|[^\r\n\p{L}\p{N}]?+\p{L}++|\p{N}{1,3}+|"""
                  r""" ?[^\s\p{L}\p{N}]++[\r\n]*+|\s++$|\s*[\r\n]|\s+(?!\S)|\s""")
PATTERNS = {'gpt2': GPT2_PATTERN, 'cl100k': CL100K_PATTERN}
# Above any vocabulary's size (o200k_base has 200k tokens): a larger id in a file is
# corruption, which would otherwise size the model's embedding table.
LARGEST_TOKEN_ID = (1 << 24) - 1
# Text of every kind a pattern tells apart, which its matches must cover, none of them empty.
SAMPLE_TEXT = "It's 2024:\n\tHello,  WORLD! naïve_x=1.5e3 中文 🙂 (a)[b]{c}\r\n \x00"
# The alternative of each pattern that matches a run of digits. No other alternative
# matches a digit, so replacing this one with a single digit splits every number into
# one pre-token per digit, as Baichuan's and Qwen's tokenizers do.
_DIGIT_RUNS = {'gpt2': r' ?\p{N}+', 'cl100k': r'\p{N}{1,3}+'}


def pretokenizer_pattern(name: str, *, split_digits: bool = False) -> str:
  if name not in PATTERNS:
    raise DataError(f'unknown pre-tokenisation pattern {name!r}; choose one of '
                    f'{", ".join(PATTERNS)}')
  if not split_digits:
    return PATTERNS[name]
  return PATTERNS[name].replace(_DIGIT_RUNS[name], r'\p{N}')


def _compiled(pattern: str, source: str | None = None):
  try:
    return regex.compile(pattern)
  except (regex.error, TypeError) as error:
    where = f' of {source}' if source else ''
    raise DataError(f'pre-tokenisation pattern{where} {pattern!r:.80} is not a valid regex '
                    f'({error}); pass one of lmlab.data.bpe.PATTERNS or a regex string') from None


def pretokenize(text: str, pattern: str) -> list[str]:
  return [match.group() for match in _compiled(pattern).finditer(text)]


def _merge_in_word(word: tuple[int, ...], pair: tuple[int, int], merged_id: int):
  """`word` with every non-overlapping occurrence of `pair`, left to right, made one token."""
  merged = []
  i = 0
  while i < len(word):
    if i + 1 < len(word) and (word[i], word[i + 1]) == pair:
      merged.append(merged_id)
      i += 2
    else:
      merged.append(word[i])
      i += 1
  return tuple(merged)


def _pairs(word: tuple[int, ...]):
  return zip(word, word[1:])


def _learn_vocabulary(word_counts: dict[bytes, int], target_size: int) -> list[bytes]:
  """Token bytes in rank order, from merging the most frequent pair until `target_size`."""
  token_bytes = [bytes([b]) for b in range(256)]
  token_ids = {token: i for i, token in enumerate(token_bytes)}
  words = [tuple(word) for word in word_counts]
  counts = list(word_counts.values())
  pair_counts = collections.Counter()
  words_with_pair = collections.defaultdict(set)
  for index, word in enumerate(words):
    for pair in _pairs(word):
      pair_counts[pair] += counts[index]
      words_with_pair[pair].add(index)

  def heap_entry(pair, count):
    left, right = token_bytes[pair[0]], token_bytes[pair[1]]
    return -count, left + right, len(left), pair

  # Entries go stale when a pair's count changes; a fresh entry is pushed for the new
  # count and stale ones are skipped when they surface.
  heap = [heap_entry(pair, count) for pair, count in pair_counts.items()]
  heapq.heapify(heap)
  while len(token_bytes) < target_size and heap:
    negative_count, merged_bytes, _, pair = heapq.heappop(heap)
    if pair_counts[pair] != -negative_count:
      continue
    # Should a pair's bytes already be a token (made from another split of the same
    # bytes), the merge reuses its id, as Hugging Face's trainer does.
    merged_id = token_ids.setdefault(merged_bytes, len(token_bytes))
    if merged_id == len(token_bytes):
      token_bytes.append(merged_bytes)
    count_changes = collections.Counter()
    for index in words_with_pair.pop(pair):
      old_word = words[index]
      new_word = _merge_in_word(old_word, pair, merged_id)
      words[index] = new_word
      for old_pair in _pairs(old_word):
        count_changes[old_pair] -= counts[index]
      for new_pair in _pairs(new_word):
        count_changes[new_pair] += counts[index]
      old_pairs, new_pairs = set(_pairs(old_word)), set(_pairs(new_word))
      for gone in old_pairs - new_pairs - {pair}:
        words_with_pair[gone].discard(index)
      for added in new_pairs - old_pairs:
        words_with_pair[added].add(index)
    for changed_pair, change in count_changes.items():
      if change:
        pair_counts[changed_pair] += change
        if pair_counts[changed_pair]:
          heapq.heappush(heap, heap_entry(changed_pair, pair_counts[changed_pair]))
        else:
          del pair_counts[changed_pair]
  return token_bytes


def train_bpe(texts: Iterable[str], vocab_size: int, *, pattern: str,
              special_tokens: Sequence[str] = ()) -> dict[bytes, int]:
  """Learns byte-level BPE ranks over `texts` for a vocabulary of `vocab_size` tokens.

  The texts are pre-tokenised with `pattern`; each distinct pre-token, as a tuple of
  token ids, keeps its count. The most frequent adjacent pair (counted over pre-token
  occurrences) is merged into a new token until there are vocab_size - len(special_tokens)
  tokens. Ties go to the pair whose merged bytes are lexicographically smallest, then to the
  one with the shorter left part. Training stops early, with a smaller vocabulary, when no
  adjacent pair is left. Special tokens only reserve room; see `special_token_ids`.
  """
  reserved = len(special_tokens)
  if len(set(special_tokens)) != reserved:
    raise DataError(f'special tokens {list(special_tokens)} repeat a name; pass distinct ones')
  if not isinstance(vocab_size, int) or vocab_size < 256 + reserved:
    raise DataError(f'vocab_size={vocab_size!r} is too small: pass at least {256 + reserved} '
                    f'(the 256 single bytes plus {reserved} special tokens)')
  compiled = _compiled(pattern)
  piece_counts = collections.Counter()
  for text in texts:
    piece_counts.update(match.group() for match in compiled.finditer(text))
  if not piece_counts:
    raise DataError('the training corpus is empty; pass texts with some non-empty text')
  word_counts = {piece.encode('utf-8'): count for piece, count in piece_counts.items()}
  vocabulary = _learn_vocabulary(word_counts, vocab_size - reserved)
  return {token: rank for rank, token in enumerate(vocabulary)}


def special_token_ids(ranks: dict[bytes, int], names: Sequence[str]) -> dict[str, int]:
  """Ids for special tokens, numbered on from the highest rank."""
  first = max(ranks.values()) + 1
  return {name: first + i for i, name in enumerate(names)}


def reference_encode(ranks: dict[bytes, int], text: str, pattern: str) -> list[int]:
  """Slow tiktoken-equivalent encoding of ordinary text, the oracle for tests.

  Each pre-token that is not itself a token (tiktoken looks that up first) starts as single
  bytes; the adjacent pair whose concatenation has the lowest rank (the leftmost on ties)
  is merged until no adjacent pair's concatenation is a token.
  """
  ids = []
  for piece in pretokenize(text, pattern):
    parts = [bytes([b]) for b in piece.encode('utf-8')]
    if b''.join(parts) in ranks:
      parts = [b''.join(parts)]
    while True:
      candidates = [(ranks[a + b], i) for i, (a, b) in enumerate(zip(parts, parts[1:]))
                    if a + b in ranks]
      if not candidates:
        break
      _, i = min(candidates)
      parts[i:i + 2] = [parts[i] + parts[i + 1]]
    ids += [ranks[part] for part in parts]
  return ids


def _sidecar_path(path: str) -> str:
  return path + '.json'


def save_tiktoken(ranks: dict[bytes, int], path: str, *, pattern: str,
                  special_tokens: dict[str, int], overwrite: bool = False):
  """Writes the `.tiktoken` ranks file at `path` and its settings at `path` + '.json'."""
  for target in (path, _sidecar_path(path)):
    if os.path.exists(target) and not overwrite:
      raise DataError(f'{target} already exists; pass overwrite=True or another path')
  _compiled(pattern)
  lines = [base64.b64encode(token) + b' ' + str(rank).encode()
           for token, rank in sorted(ranks.items(), key=lambda item: item[1])]
  write_new_file(path, b'\n'.join(lines) + b'\n', overwrite=overwrite)
  settings = {'pattern': pattern, 'special_tokens': special_tokens}
  write_new_file(_sidecar_path(path), json.dumps(settings, indent=1).encode(),
                 overwrite=overwrite)


def _parse_ranks(path: str, contents: bytes) -> dict[bytes, int]:
  ranks, line_of_rank, line_of_token = {}, {}, {}
  for number, line in enumerate(contents.splitlines(), start=1):
    if not line.strip():
      continue
    fields = line.split()
    try:
      if len(fields) != 2:
        raise ValueError(f'expected 2 fields, found {len(fields)}')
      token, rank = base64.b64decode(fields[0], validate=True), int(fields[1])
      if not 0 <= rank <= LARGEST_TOKEN_ID:
        raise ValueError(f'rank {rank} is not in 0..{LARGEST_TOKEN_ID}')
    except (ValueError, binascii.Error) as error:
      raise DataError(f'{path}, line {number}: {error}; each line must be the base64 of a '
                      'token, a space and its rank') from None
    if rank in line_of_rank:
      raise DataError(f'{path}, line {number}: rank {rank} is already given on line '
                      f'{line_of_rank[rank]}; ranks must be unique')
    if token in line_of_token:
      raise DataError(f'{path}, line {number}: token {token!r} is already given on line '
                      f'{line_of_token[token]}; tokens must be unique')
    ranks[token], line_of_rank[rank], line_of_token[token] = rank, number, number
  if not ranks:
    raise DataError(f'{path} holds no ranks; pass a .tiktoken ranks file')
  return ranks


def _settings(path: str, pattern, special_tokens):
  """(pattern, special tokens) from the sidecar file if there is one, else the arguments."""
  sidecar = _sidecar_path(path)
  if not os.path.exists(sidecar):
    if pattern is None:
      raise DataError(f'{path} has no {sidecar} beside it to give its pre-tokenisation '
                      'pattern; pass pattern= (for example lmlab.data.bpe.PATTERNS["cl100k"])')
    return pattern, dict(special_tokens or {})
  try:
    with open(sidecar, encoding='utf-8') as f:
      settings = json.load(f)
  except (ValueError, RecursionError):
    settings = None
  if not (isinstance(settings, dict) and isinstance(settings.get('pattern'), str)
          and isinstance(settings.get('special_tokens'), dict)):
    raise DataError(f'{sidecar} is not a tokenizer settings file: it must be JSON with a '
                    '"pattern" string and a "special_tokens" object; fix or remove it')
  stored_pattern, stored_specials = settings['pattern'], settings['special_tokens']
  for name, given, stored in (('pattern', pattern, stored_pattern),
                              ('special_tokens', special_tokens, stored_specials)):
    if given is not None and given != stored:
      raise DataError(f'{name}={given!r} disagrees with {stored!r} in {sidecar}; pass '
                      f'{name}=None to use the stored one')
  return stored_pattern, stored_specials


def load_tiktoken(path: str, *, pattern: str | None = None,
                  special_tokens: dict[str, int] | None = None,
                  expected_sha256: str | None = None) -> tiktoken.Encoding:
  """The Encoding of a `.tiktoken` ranks file; its name is the file's stem."""
  if not os.path.isfile(path):
    raise DataError(f'no tokenizer file at {path}; pass the path of a .tiktoken ranks file')
  try:
    with open(path, 'rb') as f:
      contents = f.read()
  except OSError as error:
    raise DataError(f'{path} cannot be read ({error.strerror})') from None
  if expected_sha256 is not None:
    actual = hashlib.sha256(contents).hexdigest()
    if actual != expected_sha256.lower():
      raise DataError(f'{path} has sha256 {actual}, not the expected {expected_sha256}; '
                      'pass the right file or its sha256')
  ranks = _parse_ranks(path, contents)
  pattern, special_tokens = _settings(path, pattern, special_tokens)
  name = os.path.splitext(os.path.basename(path))[0]
  return build_encoding(name, ranks, pattern=pattern, special_tokens=special_tokens,
                        source=path)


def encode_around(text: str, allowed, special_ids: dict[str, int], encode) -> list[int]:
  """The ids of text in which the `allowed` special tokens are tokens (special_ids) and the
  text between them is encoded piece by piece with encode(piece)."""
  ids = []
  by_length = sorted(allowed, key=len, reverse=True)
  for piece in regex.split(f'({"|".join(map(regex.escape, by_length))})', text):
    if piece in allowed:
      ids.append(special_ids[piece])
    elif piece:
      ids += encode(piece)
  return ids


# Stand-in ranks of the single bytes a vocabulary lacks: above every id a vocabulary can use.
_ABSENT_BYTE_BASE = LARGEST_TOKEN_ID + 1


class WithAbsentBytes(tiktoken.Encoding):
  """A byte-level BPE whose vocabulary lacks some of the 256 single bytes, encoding as the
  `tokenizers` library does: within each pre-token, a byte the vocabulary lacks is left out
  before the merges (so the bytes beside it may merge), or, where the model names an
  unk_token (`replacement`), it is that token.

  tiktoken needs a rank for every byte, so each absent byte gets a stand-in rank above every
  real id. The stand-ins never merge: BPE training starts from the bytes that are there, so
  none of its tokens holds an absent one. With an unk_token, encoding replaces them. Without,
  a text that gave a stand-in is encoded again pre-token by pre-token (split by Python's
  `regex` with the same pattern), each without its absent bytes. n_vocab counts the real ids.
  """

  def __init__(self, *, name: str, pat_str: str, mergeable_ranks: dict[bytes, int],
               special_tokens: dict[str, int], replacement: int | None):
    self.ordinary_ranks, self.replacement = mergeable_ranks, replacement
    self.absent_bytes = bytes(b for b in range(256) if bytes([b]) not in mergeable_ranks)
    stand_ins = {bytes([b]): _ABSENT_BYTE_BASE + b for b in self.absent_bytes}
    super().__init__(name=name, pat_str=pat_str,
                     mergeable_ranks={**mergeable_ranks, **stand_ins},
                     special_tokens=special_tokens)
    self.max_token_value = max([*mergeable_ranks.values(), *special_tokens.values()])

  def _without_absent_bytes(self, text: str) -> list[int]:
    # As tiktoken does with lone surrogates.
    text = text.encode('utf-16', 'surrogatepass').decode('utf-16', 'replace')
    ids = []
    for piece in pretokenize(text, self._pat_str):
      kept = piece.encode('utf-8').translate(None, self.absent_bytes)
      if kept:
        ids += self._encode_single_piece(kept)
    return ids

  def _fixed(self, ids: list[int], text: str, allowed_special) -> list[int]:
    if all(i < _ABSENT_BYTE_BASE for i in ids):
      return ids
    if self.replacement is not None:
      return [self.replacement if i >= _ABSENT_BYTE_BASE else i for i in ids]
    allowed = self.special_tokens_set if allowed_special == 'all' else allowed_special
    if not allowed:
      return self._without_absent_bytes(text)
    return encode_around(text, allowed, self._special_tokens, self._without_absent_bytes)

  def encode_ordinary(self, text: str) -> list[int]:
    return self._fixed(super().encode_ordinary(text), text, ())

  def encode(self, text: str, *, allowed_special=frozenset(),
             disallowed_special='all') -> list[int]:
    ids = super().encode(text, allowed_special=allowed_special,
                         disallowed_special=disallowed_special)
    return self._fixed(ids, text, allowed_special)


def build_encoding(name: str, ranks: dict[bytes, int], *, pattern: str,
                   special_tokens: dict[str, int], source: str,
                   absent_bytes: str | int = 'refuse') -> tiktoken.Encoding:
  """A tiktoken Encoding; unusable settings raise DataError naming `source`. A vocabulary
  without some of the 256 single bytes is refused, or, with absent_bytes 'drop' or a
  replacement id, encodes as WithAbsentBytes."""
  matches = list(_compiled(pattern, source).finditer(SAMPLE_TEXT))
  if any(match.start() == match.end() for match in matches):
    # tiktoken stops the process at an empty pre-token.
    raise DataError(f'the pre-tokenisation pattern of {source}, {pattern!r:.80}, matches the '
                    'empty string; pass one whose every match holds some text')
  if ''.join(match.group() for match in matches) != SAMPLE_TEXT:
    # tiktoken drops the text between matches without a word.
    raise DataError(f'the pre-tokenisation pattern of {source}, {pattern!r:.80}, skips some '
                    'of a sample text; pass one whose matches cover any text')
  missing = 256 - sum(len(token) == 1 for token in ranks)
  if missing and absent_bytes == 'refuse':
    # tiktoken would stop the process at the first text holding a missing byte.
    raise DataError(f'{source} lacks {missing} of the 256 single-byte tokens that byte-level '
                    'BPE needs to encode any text; pass a complete vocabulary')
  rank_values = set(ranks.values())
  special_ids = {}
  for token, token_id in special_tokens.items():
    if not token:  # tiktoken loops forever on an empty one.
      raise DataError(f'{source} has a special token {token!r}; name each with some text')
    if (type(token_id) is not int or token_id in rank_values
        or not 0 <= token_id <= LARGEST_TOKEN_ID):
      raise DataError(f'special token {token!r} of {source} has id {token_id!r:.60}, which is '
                      f'not an integer in 0..{LARGEST_TOKEN_ID} or is the rank of an ordinary '
                      f'token; pass ids no ordinary token has (above {max(rank_values)}, say)')
    if token_id in special_ids:
      raise DataError(f'special tokens {special_ids[token_id]!r} and {token!r} of {source} '
                      f'share the id {token_id}; give each its own')
    special_ids[token_id] = token
  settings = dict(name=name, pat_str=pattern, mergeable_ranks=ranks,
                  special_tokens=special_tokens)
  try:
    if missing:
      return WithAbsentBytes(**settings,
                             replacement=None if absent_bytes == 'drop' else absent_bytes)
    return tiktoken.Encoding(**settings)
  except ValueError as error:
    raise DataError(f'tiktoken rejects the tokenizer of {source}: {error}; pass a pattern '
                    'in the syntax tiktoken accepts') from None


def with_special_tokens(encoding: tiktoken.Encoding, special_tokens: dict[str, int],
                        source: str) -> tiktoken.Encoding:
  """The encoding with `special_tokens` as its special tokens (tiktoken's README extends an
  Encoding through these attributes)."""
  if isinstance(encoding, WithAbsentBytes):
    return build_encoding(encoding.name, encoding.ordinary_ranks, pattern=encoding._pat_str,
                          special_tokens=special_tokens, source=source,
                          absent_bytes=('drop' if encoding.replacement is None
                                        else encoding.replacement))
  return build_encoding(encoding.name, encoding._mergeable_ranks, pattern=encoding._pat_str,
                        special_tokens=special_tokens, source=source)
