"""Byte-level BPE: trainer against a naive recount, tiktoken against the reference encoder."""
import base64
import collections
import hashlib
import os

import pytest
import regex
import tiktoken.load

from conftest import random_code_points
from lmlab.data.errors import DataError
from lmlab.data import bpe

END_OF_TEXT = '<|endoftext|>'
PATTERN_CHOICES = [('gpt2', False), ('gpt2', True), ('cl100k', False), ('cl100k', True)]
# Runs of these make pre-tokens of every kind: words, contractions, CJK, emoji,
# digit runs, punctuation and whitespace runs.
ALPHABETS = ['abcde', 'xyzXYZ', "'s", '中文字节码', '🙂🚀é', '0123456789', '  ', ' \t\n\r',
             '.,;!?-_(){}']


def random_text(rng, n_runs, alphabets=ALPHABETS):
  runs = []
  for _ in range(n_runs):
    alphabet = list(alphabets[rng.integers(len(alphabets))])
    runs.append(''.join(rng.choice(alphabet, rng.integers(1, 7))))
  return ''.join(runs)


def random_pattern(rng):
  name, split_digits = PATTERN_CHOICES[rng.integers(len(PATTERN_CHOICES))]
  return bpe.pretokenizer_pattern(name, split_digits=split_digits)


def naive_train(texts, vocab_size, pattern):
  """Recounts every pair before each merge; same tie-break as train_bpe."""
  words = collections.Counter(tuple(bytes([b]) for b in piece.encode('utf-8'))
                              for text in texts for piece in regex.findall(pattern, text))
  vocabulary = [bytes([b]) for b in range(256)]
  while len(vocabulary) < vocab_size:
    pair_counts = collections.Counter()
    for word, count in words.items():
      for pair in zip(word, word[1:]):
        pair_counts[pair] += count
    if not pair_counts:
      break
    left, right = min(pair_counts,
                      key=lambda p: (-pair_counts[p], p[0] + p[1], len(p[0])))
    if left + right not in vocabulary:
      vocabulary.append(left + right)
    merged_words = collections.Counter()
    for word, count in words.items():
      parts, i = [], 0
      while i < len(word):
        if word[i:i + 2] == (left, right):
          parts.append(left + right)
          i += 2
        else:
          parts.append(word[i])
          i += 1
      merged_words[tuple(parts)] += count
    words = merged_words
  return {token: rank for rank, token in enumerate(vocabulary)}


def trained_encoding(rng, special_tokens=(END_OF_TEXT,)):
  pattern = random_pattern(rng)
  texts = [random_text(rng, 60) for _ in range(20)]
  ranks = bpe.train_bpe(texts, 256 + 150 + len(special_tokens), pattern=pattern,
                        special_tokens=special_tokens)
  specials = bpe.special_token_ids(ranks, special_tokens)
  encoding = bpe.build_encoding('trained', ranks, pattern=pattern, special_tokens=specials,
                                source='test')
  return encoding, ranks, pattern, specials


@pytest.mark.parametrize('alphabets', [['ab', 'aab ', ' '], ALPHABETS])
def test_trainer_makes_the_merges_of_a_naive_full_recount(rng, alphabets):
  for _ in range(4):
    pattern = random_pattern(rng)
    texts = [random_text(rng, 30, alphabets) for _ in range(int(rng.integers(1, 8)))]
    vocab_size = 256 + int(rng.integers(1, 120))
    assert bpe.train_bpe(texts, vocab_size, pattern=pattern) == naive_train(
        texts, vocab_size, pattern)


def test_ranks_are_bytes_then_merges_and_fill_the_vocabulary(rng):
  _, ranks, _, specials = trained_encoding(rng, special_tokens=(END_OF_TEXT, '<|pad|>'))
  assert len(ranks) + len(specials) == 256 + 150 + 2
  assert sorted(ranks.values()) == list(range(len(ranks)))
  assert all(ranks[bytes([b])] == b for b in range(256))
  assert sorted(specials.values()) == [len(ranks), len(ranks) + 1]


def test_tiktoken_encodes_as_the_reference_encoder(rng):
  encoding, ranks, pattern, _ = trained_encoding(rng)
  for text in [random_text(rng, 200), random_code_points(rng, 100) + random_text(rng, 50)]:
    assert encoding.encode_ordinary(text) == bpe.reference_encode(ranks, text, pattern)


def test_tiktoken_encodes_as_the_reference_encoder_with_arbitrary_ranks(rng):
  """Ranks that no trainer makes: random substrings in random order, so some tokens
  are unreachable by merges (tiktoken still uses a pre-token that is itself a token)."""
  pattern = random_pattern(rng)
  corpus = random_text(rng, 300).encode('utf-8')
  starts = rng.integers(0, len(corpus) - 8, 400)
  tokens = {corpus[s:s + n] for s, n in zip(starts, rng.integers(2, 8, 400))}
  ranks = {bytes([b]): b for b in range(256)}
  ranks.update({token: 256 + i for i, token in enumerate(rng.permutation(sorted(tokens)))})
  encoding = bpe.build_encoding('arbitrary', ranks, pattern=pattern, special_tokens={},
                                source='test')
  text = corpus.decode('utf-8') + random_text(rng, 100)
  assert encoding.encode_ordinary(text) == bpe.reference_encode(ranks, text, pattern)


def test_any_unicode_round_trips(rng):
  encoding, *_ = trained_encoding(rng)
  text = random_code_points(rng, 500) + random_text(rng, 100)
  ids = encoding.encode_ordinary(text)
  assert encoding.decode_bytes(ids) == text.encode('utf-8')
  assert encoding.decode(ids) == text


def test_special_tokens_come_only_from_allowed_special_text(rng):
  encoding, _, _, specials = trained_encoding(rng, special_tokens=(END_OF_TEXT, '<|pad|>'))
  text = random_text(rng, 30) + END_OF_TEXT + '<|pad|>' + random_text(rng, 30)
  assert not set(encoding.encode_ordinary(text)) & set(specials.values())
  assert set(specials.values()) <= set(encoding.encode(text, allowed_special='all'))


def test_split_digits_makes_each_digit_its_own_pre_token(rng):
  digit_rich = ALPHABETS + ['0123456789٣४'] * 4
  text = random_text(rng, 300, digit_rich)
  for name in bpe.PATTERNS:
    pattern = bpe.pretokenizer_pattern(name, split_digits=True)
    pieces = regex.findall(pattern, text)
    assert ''.join(pieces) == text
    assert all(len(piece) == 1 for piece in pieces if regex.search(r'\p{N}', piece))
    without_digits = regex.sub(r'\p{N}', '', text)
    assert regex.findall(pattern, without_digits) == regex.findall(bpe.PATTERNS[name],
                                                                   without_digits)
    # tiktoken's regex engine agrees, even with multi-digit tokens in the vocabulary.
    ranks = bpe.train_bpe([text], 256 + 100, pattern=bpe.PATTERNS[name])
    assert any(regex.fullmatch(r'\d\d+', token.decode('utf-8', 'replace')) for token in ranks)
    encoding = bpe.build_encoding('split', ranks, pattern=pattern, special_tokens={},
                                  source='test')
    assert encoding.encode_ordinary(text) == bpe.reference_encode(ranks, text, pattern)
    digits = ''.join(rng.choice(list('0123456789'), 30))
    assert len(encoding.encode_ordinary(digits)) == 30


def test_save_load_round_trip(rng, tmp_path, monkeypatch):
  encoding, ranks, pattern, specials = trained_encoding(rng)
  path = str(tmp_path / 'mine.tiktoken')
  bpe.save_tiktoken(ranks, path, pattern=pattern, special_tokens=specials)
  monkeypatch.setenv('TIKTOKEN_CACHE_DIR', '')  # tiktoken's own parser, uncached
  assert tiktoken.load.load_tiktoken_bpe(path) == ranks
  with open(path, 'rb') as f:
    sha256 = hashlib.sha256(f.read()).hexdigest()
  loaded = bpe.load_tiktoken(path, expected_sha256=sha256)
  assert loaded.name == 'mine'
  assert loaded.n_vocab == encoding.n_vocab
  assert loaded.encode_single_token(END_OF_TEXT) == specials[END_OF_TEXT]
  text = random_text(rng, 100) + random_code_points(rng, 50)
  assert loaded.encode_ordinary(text) == bpe.reference_encode(ranks, text, pattern)


def test_save_never_overwrites_unless_asked(rng, tmp_path):
  _, ranks, pattern, specials = trained_encoding(rng)
  path = str(tmp_path / 'mine.tiktoken')
  bpe.save_tiktoken(ranks, path, pattern=pattern, special_tokens=specials)
  before = sorted(os.listdir(tmp_path))
  smaller = {bytes([b]): b for b in range(256)}
  with pytest.raises(DataError, match='already exists'):
    bpe.save_tiktoken(smaller, path, pattern=pattern, special_tokens={})
  assert sorted(os.listdir(tmp_path)) == before == ['mine.tiktoken', 'mine.tiktoken.json']
  assert bpe.load_tiktoken(path).n_vocab == len(ranks) + 1
  bpe.save_tiktoken(smaller, path, pattern=pattern, special_tokens={}, overwrite=True)
  assert bpe.load_tiktoken(path).n_vocab == 256


def write_ranks_file(path, lines):
  """A ranks file in the format of OpenAI's cl100k_base.tiktoken, with no sidecar."""
  with open(path, 'wb') as f:
    f.write(b''.join(line + b'\n' for line in lines))


def byte_rank_lines():
  return [base64.b64encode(bytes([b])) + b' %d' % b for b in range(256)]


def test_a_file_in_openai_format_loads_with_a_given_pattern(rng, tmp_path):
  path = str(tmp_path / 'cl100k_base.tiktoken')
  merges = [b'ab', b'abc', b' \xe4\xb8\xad']
  write_ranks_file(path, byte_rank_lines() + [base64.b64encode(token) + b' %d' % (256 + i)
                                              for i, token in enumerate(merges)])
  with pytest.raises(DataError, match='pass pattern='):
    bpe.load_tiktoken(path)
  encoding = bpe.load_tiktoken(path, pattern=bpe.PATTERNS['cl100k'],
                               special_tokens={END_OF_TEXT: 100257})
  assert encoding.name == 'cl100k_base'
  assert encoding.encode_ordinary('abcab 中') == [257, 256, 258]
  assert encoding.encode(END_OF_TEXT, allowed_special='all') == [100257]


@pytest.mark.parametrize('bad_line, error', [
    (b'not*base64 300', 'line 257'),
    (b'YWJj', 'line 257: expected 2 fields'),
    (b'YWJj x', 'line 257'),
    (b'YWJj -1', 'line 257: rank -1 is not in 0..'),
    (b'YWJj 7', 'line 257: rank 7 is already given on line 8'),
    (b'AA== 300', 'line 257: token .* is already given on line 1'),
])
def test_bad_ranks_line_is_reported_with_its_number(tmp_path, bad_line, error):
  path = str(tmp_path / 'bad.tiktoken')
  write_ranks_file(path, byte_rank_lines() + [bad_line])
  with pytest.raises(DataError, match=error):
    bpe.load_tiktoken(path, pattern=bpe.PATTERNS['gpt2'])


def test_wrong_sha256_and_missing_file_are_errors(tmp_path):
  path = str(tmp_path / 'bytes.tiktoken')
  write_ranks_file(path, byte_rank_lines())
  with pytest.raises(DataError, match='not the expected'):
    bpe.load_tiktoken(path, pattern=bpe.PATTERNS['gpt2'], expected_sha256='0' * 64)
  with pytest.raises(DataError, match='no tokenizer file'):
    bpe.load_tiktoken(path + '.missing', pattern=bpe.PATTERNS['gpt2'])


def test_bad_or_contradicted_sidecar_is_an_error(tmp_path):
  path = str(tmp_path / 'bytes.tiktoken')
  ranks = {bytes([b]): b for b in range(256)}
  bpe.save_tiktoken(ranks, path, pattern=bpe.PATTERNS['gpt2'], special_tokens={})
  with pytest.raises(DataError, match='disagrees'):
    bpe.load_tiktoken(path, pattern=bpe.PATTERNS['cl100k'])
  with open(path + '.json', 'w') as f:
    f.write('{"pattern": 3}')
  with pytest.raises(DataError, match='not a tokenizer settings file'):
    bpe.load_tiktoken(path)


@pytest.mark.parametrize('pattern, error', [
    (r'\p{L}+|\s+', 'skips some'),        # digits and punctuation fall between matches
    (r'\p{L}*|\s', 'matches the empty'),
    (r'[a-', 'not a valid regex'),
])
def test_unusable_pattern_is_refused_naming_the_file(tmp_path, pattern, error):
  path = str(tmp_path / 'bytes.tiktoken')
  write_ranks_file(path, byte_rank_lines())
  with pytest.raises(DataError, match=f'{error}.*') as raised:
    bpe.load_tiktoken(path, pattern=pattern)
  assert path in str(raised.value)


def test_special_token_id_that_is_a_rank_is_an_error(tmp_path):
  path = str(tmp_path / 'bytes.tiktoken')
  write_ranks_file(path, byte_rank_lines())
  with pytest.raises(DataError, match='rank of an ordinary token'):
    bpe.load_tiktoken(path, pattern=bpe.PATTERNS['gpt2'], special_tokens={END_OF_TEXT: 3})


def test_vocabulary_too_small_or_corpus_empty_are_errors(rng):
  texts = [random_text(rng, 20)]
  with pytest.raises(DataError, match='pass at least 258'):
    bpe.train_bpe(texts, 257, pattern=bpe.PATTERNS['gpt2'], special_tokens=('<a>', '<b>'))
  assert len(bpe.train_bpe(texts, 258, pattern=bpe.PATTERNS['gpt2'],
                           special_tokens=('<a>', '<b>'))) == 256
  for empty in ([], ['', '']):
    with pytest.raises(DataError, match='corpus is empty'):
      bpe.train_bpe(empty, 300, pattern=bpe.PATTERNS['gpt2'])
  with pytest.raises(DataError, match='unknown pre-tokenisation pattern'):
    bpe.pretokenizer_pattern('gpt3')
