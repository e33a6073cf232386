"""WordPiece as BERT uses it: basic tokenisation, greedy sub-word lookup, a trainer, vocab.txt.

Basic tokenisation gives the words `transformers.BertTokenizer` gives (the Rust-backed
class in transformers 5; `do_lower_case` with accent stripping tied to it, Chinese
characters isolated): drop NUL, U+FFFD and every character of a Unicode category C* but
tab, newline and carriage return; cut at whitespace (space, tab, newline, carriage return,
category Zs, and the separators U+2028 and U+2029); give each CJK ideograph its own word;
when lower-casing, lower-case each character, decompose (NFD) and drop combining marks
(category Mn); then give each punctuation character its own word.

Where Hugging Face's two BERT tokenizers disagree, this follows `BertTokenizer`, not the
Python `BertTokenizerLegacy` (Google's original, plus an NFC step):
- no NFC composition: with lower-casing off, decomposed accents stay decomposed;
- no final-sigma rule: a word-final Σ lower-cases to σ, not ς;
- the CJK extension E range starts at U+2B920, not U+2B820.
Character categories come from Python's `unicodedata`. The Rust tokenizer's tables are
older: it keeps unassigned code points (category Cn), which are dropped here, and does
not know the marks and punctuation of scripts added to Unicode in recent years.

Both Hugging Face tokenizers turn the text "[MASK]" into the [MASK] token by default. Here
text is only ever text: "[MASK]" becomes "[", "mask" (or "MASK") and "]", as with
`BertTokenizer(..., split_special_tokens=True)`. Every special token holds a punctuation
character and more than one character, and punctuation is always a word of its own, so
no special token comes out of ordinary text.
"""
import collections
import functools
import hashlib
import heapq
import os
import string
import unicodedata
from collections.abc import Iterable, Sequence

from lmlab.data.errors import DataError
from lmlab.data.files import read_lines, write_new_file

UNKNOWN = '[UNK]'
BERT_SPECIAL_TOKENS = ('[PAD]', UNKNOWN, '[CLS]', '[SEP]', '[MASK]')
CONTINUATION_PREFIX = '##'
# BERT gives up on longer words: they become [UNK] whole.
MAX_WORD_CHARS = 100

# The CJK ideograph blocks as the Rust tokenizer behind transformers.BertTokenizer has them:
# its fifth range starts at U+2B920, where Google's BERT and the Python tokenizer have U+2B820.
_CJK_BLOCKS = ((0x4E00, 0x9FFF), (0x3400, 0x4DBF), (0x20000, 0x2A6DF), (0x2A700, 0x2B73F),
               (0x2B740, 0x2B81F), (0x2B920, 0x2CEAF), (0xF900, 0xFAFF), (0x2F800, 0x2FA1F))
# The C0 and C1 control characters (category Cc) other than tab, newline and carriage
# return. Removing them before `str.split` leaves exactly BERT's whitespace to split at:
# Python counts some of them (U+001C..U+001F, U+0085) as whitespace, BERT deletes them.
_CONTROL_CHARACTERS = {code: None for code in [*range(0x00, 0x09), 0x0B, 0x0C,
                                               *range(0x0E, 0x20), *range(0x7F, 0xA0)]}


@functools.lru_cache(maxsize=None)
def _is_dropped(char: str) -> bool:
  return char == '\ufffd' or unicodedata.category(char).startswith('C')


@functools.lru_cache(maxsize=None)
def _is_cjk(char: str) -> bool:
  code = ord(char)
  return any(low <= code <= high for low, high in _CJK_BLOCKS)


@functools.lru_cache(maxsize=None)
def _is_punctuation(char: str) -> bool:
  # BERT counts every ASCII symbol as punctuation, "$", "^" and "`" included.
  return char in string.punctuation or unicodedata.category(char).startswith('P')


def _lower_and_strip_accents(text: str) -> str:
  if text.isascii():
    return text.lower()
  # Character by character, as the Rust tokenizer does: `str.lower` alone would turn a
  # word-final sigma into ς, which BertTokenizer keeps as σ.
  lowered = ''.join(map(str.lower, text))
  return ''.join(char for char in unicodedata.normalize('NFD', lowered)
                 if unicodedata.category(char) != 'Mn')


def _split_off(text: str, is_own_word) -> list[str]:
  """`text` cut so that each character for which `is_own_word` holds is a word of its own."""
  words, start = [], 0
  for at, char in enumerate(text):
    if is_own_word(char):
      words += [text[start:at], char]
      start = at + 1
  words.append(text[start:])
  return [word for word in words if word]


def _chunks(text: str) -> list[str]:
  """The whitespace-free runs of `text` that BERT tokenises separately."""
  return text.translate(_CONTROL_CHARACTERS).split()


@functools.lru_cache(maxsize=1 << 16)
def _words_of_chunk(chunk: str, lowercase: bool) -> tuple[str, ...]:
  kept = ''.join(char for char in chunk if not _is_dropped(char))
  words = []
  for part in _split_off(kept, _is_cjk):
    if lowercase:
      part = _lower_and_strip_accents(part)
    words += _split_off(part, _is_punctuation)
  return tuple(words)


def basic_tokenize(text: str, *, lowercase: bool) -> list[str]:
  """BERT's words of `text`, before WordPiece splits them further."""
  return [word for chunk in _chunks(text) for word in _words_of_chunk(chunk, lowercase)]


def _continuation(text: str) -> str:
  return CONTINUATION_PREFIX + text


def _check_special_tokens(special_tokens: Sequence[str]):
  if len(set(special_tokens)) != len(special_tokens):
    raise DataError(f'special tokens {list(special_tokens)} repeat a name; pass distinct ones')
  for token in special_tokens:
    if len(token) < 2 or not any(map(_is_punctuation, token)):
      raise DataError(f'special token {token!r} could come out of ordinary text; give each '
                      'special token at least two characters, one of them punctuation, as '
                      'in [MASK]')


def _word_counts(texts: Iterable[str], lowercase: bool) -> collections.Counter:
  chunk_counts = collections.Counter()
  for text in texts:
    chunk_counts.update(_chunks(text))
  word_counts = collections.Counter()
  for chunk, count in chunk_counts.items():
    for word in _words_of_chunk(chunk, lowercase):
      if len(word) <= MAX_WORD_CHARS:  # Longer ones only ever encode as [UNK].
        word_counts[word] += count
  return word_counts


class _PairStatistics:
  """Words as symbol ids, with symbol and adjacent-pair frequencies kept up to date.

  A frequency counts occurrences in the corpus: each distinct word's occurrences are
  weighted by how often the word occurs.
  """

  def __init__(self, word_counts: dict[str, int]):
    self.symbols: list[str] = []
    self._symbol_ids: dict[str, int] = {}
    self.words = [[self.symbol_id(word[0])] +
                  [self.symbol_id(_continuation(char)) for char in word[1:]]
                  for word in word_counts]
    self._word_counts = list(word_counts.values())
    self.symbol_freq = collections.Counter()
    self.pair_freq = collections.Counter()
    self._words_with_pair = collections.defaultdict(set)
    self._pairs_with_symbol = collections.defaultdict(set)
    pair_changes = collections.Counter()
    for index, word in enumerate(self.words):
      for symbol in word:
        self.symbol_freq[symbol] += self._word_counts[index]
      for pair in zip(word, word[1:]):
        pair_changes[pair] += self._word_counts[index]
        self._words_with_pair[pair].add(index)
    self._apply(pair_changes)

  def symbol_id(self, text: str) -> int:
    if text not in self._symbol_ids:
      self._symbol_ids[text] = len(self.symbols)
      self.symbols.append(text)
    return self._symbol_ids[text]

  def score(self, pair: tuple[int, int]) -> float:
    left, right = pair
    return self.pair_freq[pair] / (self.symbol_freq[left] * self.symbol_freq[right])

  def pairs_with(self, symbol: int) -> set[tuple[int, int]]:
    return self._pairs_with_symbol[symbol]

  def _apply(self, pair_changes: collections.Counter):
    for pair, change in pair_changes.items():
      if not change:
        continue
      was_present = pair in self.pair_freq
      self.pair_freq[pair] += change
      if not self.pair_freq[pair]:
        del self.pair_freq[pair]
        for symbol in pair:
          self._pairs_with_symbol[symbol].discard(pair)
      elif not was_present:
        for symbol in pair:
          self._pairs_with_symbol[symbol].add(pair)

  def merge(self, pair: tuple[int, int], merged: int) -> set[tuple[int, int]]:
    """Merges `pair` into `merged` everywhere, left to right; returns pairs whose counts changed."""
    left, right = pair
    pair_changes = collections.Counter()
    for index in self._words_with_pair.pop(pair):
      old_word, count = self.words[index], self._word_counts[index]
      new_word, at = [], 0
      while at < len(old_word):
        if old_word[at:at + 2] == [left, right]:
          new_word.append(merged)
          at += 2
        else:
          new_word.append(old_word[at])
          at += 1
      n_merged = len(old_word) - len(new_word)
      self.symbol_freq[left] -= count * n_merged
      self.symbol_freq[right] -= count * n_merged
      self.symbol_freq[merged] += count * n_merged
      old_pairs, new_pairs = list(zip(old_word, old_word[1:])), list(zip(new_word, new_word[1:]))
      for old_pair in old_pairs:
        pair_changes[old_pair] -= count
      for new_pair in new_pairs:
        pair_changes[new_pair] += count
      for gone in set(old_pairs) - set(new_pairs) - {pair}:
        self._words_with_pair[gone].discard(index)
      for added in set(new_pairs) - set(old_pairs):
        self._words_with_pair[added].add(index)
      self.words[index] = new_word
    self._apply(pair_changes)
    return {changed for changed, change in pair_changes.items() if change}


def _learned_pieces(word_counts: dict[str, int], n_pieces: int, known: set[str]) -> list[str]:
  """Up to `n_pieces` new pieces, in merge order, from merging the best-scoring pair."""
  statistics = _PairStatistics(word_counts)
  symbols = statistics.symbols

  def heap_entry(pair):
    left, right = pair
    return (-statistics.score(pair), -statistics.pair_freq[pair], symbols[left],
            symbols[right], pair)

  # A pair's score changes when its own count or the frequency of either of its symbols
  # does; each such change pushes a fresh entry, and entries that no longer match the
  # current statistics are skipped when they surface.
  heap = [heap_entry(pair) for pair in statistics.pair_freq]
  heapq.heapify(heap)
  pieces = []
  while len(pieces) < n_pieces and heap:
    entry = heapq.heappop(heap)
    pair = entry[-1]
    if pair not in statistics.pair_freq or heap_entry(pair) != entry:
      continue
    left, right = pair
    # The right symbol always continues a word, so it carries the prefix; the merged
    # piece starts a word exactly when the left one does.
    merged_text = symbols[left] + symbols[right][len(CONTINUATION_PREFIX):]
    if merged_text not in known:
      known.add(merged_text)
      pieces.append(merged_text)
    merged = statistics.symbol_id(merged_text)
    stale = statistics.merge(pair, merged)
    for symbol in (left, right, merged):
      stale |= statistics.pairs_with(symbol)
    for stale_pair in stale:
      if stale_pair in statistics.pair_freq:
        heapq.heappush(heap, heap_entry(stale_pair))
  return pieces


def train_wordpiece(texts: Iterable[str], vocab_size: int, *, lowercase: bool,
                    special_tokens: Sequence[str] = BERT_SPECIAL_TOKENS) -> list[str]:
  """A WordPiece vocabulary (pieces in id order) of at most `vocab_size` pieces.

  Words are counted after basic tokenisation (words over MAX_WORD_CHARS characters are
  left out). The vocabulary starts with the special tokens, then every character that
  starts a word, then every character that continues one, as "##" + character, each group
  in code-point order. Each word starts split into those characters. Then, until the
  vocabulary is full or no word has two symbols left, the adjacent pair (a, b) with the
  highest score freq(ab) / (freq(a) * freq(b)) (frequencies of the current split of the
  corpus, the score a float64 division) is merged in every word, left to right, and its
  merged piece added if new: a + b without b's "##", so it starts a word when a does.
  Equal scores go to the pair with the larger freq(ab), then to the smallest
  (a, b) in string order.
  """
  _check_special_tokens(special_tokens)
  word_counts = _word_counts(texts, lowercase)
  if not word_counts:
    raise DataError('the training corpus has no words; pass texts with some non-space text')
  initial = sorted({word[0] for word in word_counts})
  continuing = sorted({char for word in word_counts for char in word[1:]})
  vocabulary = list(special_tokens)
  known = set(vocabulary)
  for piece in initial + [_continuation(char) for char in continuing]:
    if piece not in known:
      known.add(piece)
      vocabulary.append(piece)
  if not isinstance(vocab_size, int) or vocab_size < len(vocabulary):
    raise DataError(f'vocab_size={vocab_size!r} is too small: the special tokens and the '
                    f'characters of the corpus alone take {len(vocabulary)}; pass at least '
                    'that')
  return vocabulary + _learned_pieces(word_counts, vocab_size - len(vocabulary), known)


def _read_vocab_file(path: str) -> list[str]:
  if not os.path.isfile(path):
    raise DataError(f'no vocabulary file at {path}; pass the path of a WordPiece vocab.txt')
  # Universal newlines, as Hugging Face reads vocab.txt, so ids agree on CRLF files.
  lines = read_lines(path)
  return lines[:-1] if lines[-1] == '' else lines


def _checked_pieces(pieces: list[str], source: str) -> list[str]:
  line_of_piece = {}
  for line, piece in enumerate(pieces, start=1):
    if not isinstance(piece, str) or piece.split() != [piece]:
      raise DataError(f'{source}, line {line}: piece {piece!r} is empty or holds whitespace, '
                      'which no word can match; pass one piece per line')
    if piece in line_of_piece:
      raise DataError(f'{source}, line {line}: piece {piece!r} repeats line '
                      f'{line_of_piece[piece]}; each piece must appear once')
    line_of_piece[piece] = line
  if UNKNOWN not in line_of_piece:
    raise DataError(f'{source} has no {UNKNOWN} piece, which words the vocabulary cannot '
                    'cover encode to; add it')
  return pieces


class WordPieceTokenizer:
  """BERT's tokenizer over a vocabulary, with the methods of a tiktoken Encoding in use here.

  `vocab` is a list of pieces (id = position) or the path of a vocab.txt (id = line
  number, from 0). Continuation pieces start with "##".
  """

  def __init__(self, vocab: list[str] | str | os.PathLike, *, lowercase: bool = True):
    if isinstance(vocab, (str, os.PathLike)):
      pieces = _checked_pieces(_read_vocab_file(os.fspath(vocab)), os.fspath(vocab))
    else:
      pieces = _checked_pieces(list(vocab), 'the vocabulary list')
    self.pieces = pieces
    self.lowercase = lowercase
    self._ids = {piece: token_id for token_id, piece in enumerate(pieces)}
    self._longest_piece = max(map(len, pieces))
    self._word_ids = functools.lru_cache(maxsize=1 << 16)(self._uncached_word_ids)
    digest = hashlib.sha1('\n'.join(pieces).encode('utf-8')).hexdigest()[:12]
    self.name = f'wordpiece-{"uncased" if lowercase else "cased"}-{digest}'

  @property
  def n_vocab(self) -> int:
    return len(self.pieces)

  @property
  def special_ids(self) -> dict[str, int]:
    """Ids of BERT's special tokens ([PAD] [UNK] [CLS] [SEP] [MASK]) in the vocabulary."""
    return {token: self._ids[token] for token in BERT_SPECIAL_TOKENS if token in self._ids}

  def _uncached_word_ids(self, word: str) -> tuple[int, ...]:
    """Greedy longest match first; the whole word is [UNK] if some part matches nothing."""
    if len(word) > MAX_WORD_CHARS:
      return (self._ids[UNKNOWN],)
    ids, start = [], 0
    while start < len(word):
      for end in range(min(len(word), start + self._longest_piece), start, -1):
        piece = word[start:end] if start == 0 else _continuation(word[start:end])
        if piece in self._ids:
          ids.append(self._ids[piece])
          start = end
          break
      else:
        return (self._ids[UNKNOWN],)
    return tuple(ids)

  def encode_ordinary(self, text: str) -> list[int]:
    return [token_id for word in basic_tokenize(text, lowercase=self.lowercase)
            for token_id in self._word_ids(word)]

  def tokenize(self, text: str) -> list[str]:
    return [self.pieces[token_id] for token_id in self.encode_ordinary(text)]

  def encode_single_token(self, piece: str) -> int:
    if piece not in self._ids:
      raise DataError(f'{piece!r} is not a piece of {self.name}; its special tokens are '
                      f'{", ".join(self.special_ids)}')
    return self._ids[piece]

  def decode(self, ids: Iterable[int], errors: str = 'replace') -> str:
    """Pieces joined into space-separated words, each "##" piece glued to the one before.

    An id outside the vocabulary raises DataError with errors='strict' and becomes U+FFFD
    with errors='replace' (tiktoken's replacement for bytes that are not UTF-8).
    """
    if errors not in ('strict', 'replace'):
      raise DataError(f'errors={errors!r}; pass "strict" or "replace"')
    parts = []
    for token_id in ids:
      if 0 <= token_id < len(self.pieces):
        piece = self.pieces[token_id]
      elif errors == 'replace':
        piece = '\ufffd'
      else:
        raise DataError(f'token id {token_id} is outside the vocabulary of {self.name} '
                        f'(0..{len(self.pieces) - 1})')
      if piece.startswith(CONTINUATION_PREFIX):
        parts.append(piece[len(CONTINUATION_PREFIX):])
      else:
        parts += [' ', piece] if parts else [piece]
    return ''.join(parts)

  def save(self, path: str, *, overwrite: bool = False) -> str:
    """Writes the vocabulary as a vocab.txt at `path`, atomically; returns `path`."""
    write_new_file(path, ''.join(piece + '\n' for piece in self.pieces).encode('utf-8'),
                   overwrite=overwrite)
    return path
