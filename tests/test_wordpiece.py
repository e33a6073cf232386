"""WordPiece against transformers.BertTokenizer, and its trainer against a naive recount."""
import collections
import os

import pytest

from lmlab.data.errors import DataError
from lmlab.data import wordpiece

transformers = pytest.importorskip('transformers')

# Runs of these make every kind of character basic tokenisation treats in its own way.
# All are assigned in old Unicode versions, whose tables the Rust tokenizer agrees on.
TRAINED_ALPHABETS = [
    'abcdehilnorst', 'XYZÉÖÅ', '0123456789', '.,;!?-_()[]{}#$^`~@',
    ' \t\n\r\u00a0\u3000\u2028',  # whitespace
    '\x00\x07\x1f\x85\ufffd\u200d',  # dropped: NUL, controls, U+FFFD, a format character
    # CJK, with a compatibility ideograph, extension B, and extension E on both sides of
    # where the Rust tokenizer's CJK range starts (U+2B920).
    '中文字节码\uf900\U00020000\U0002b820\U0002b91f\U0002b920',
    # Accents, precomposed and combining (Mn), and marks that stay: enclosing, spacing.
    'éñçåİẞ\u0301\u0308\u20dd\u0903',
    'ΑΣσςΒ',  # upper-case sigma lowers to σ or ς depending on context in Python
    '“”—。、¿«»€°\u1fef',  # punctuation and symbols; U+1FEF decomposes to "`"
]
# Left out of training, so words with them are [UNK] unless HAND_PICKED covers them.
UNTRAINED_ALPHABETS = ['한국어ひらがなカタ', '🙂🚀👍🏽\ufe0f']
HAND_PICKED = ['a', '##a', 'hello', '##llo', 'the', '##st', '🙂', '##🚀', '##🏽', '한', '##국']
SPECIAL_NAMES = ['[PAD]', '[CLS]', '[SEP]', '[MASK]']


def random_text(rng, n_runs, alphabets):
  runs = []
  for _ in range(n_runs):
    alphabet = list(alphabets[rng.integers(len(alphabets))])
    runs.append(''.join(rng.choice(alphabet, rng.integers(1, 7))))
  return ''.join(runs)


def random_corpus(rng, n_texts, alphabets):
  return [random_text(rng, 30, alphabets) for _ in range(n_texts)]


def bert_words(lowercase):
  """Basic tokenisation by transformers.BertTokenizer's normaliser and pre-tokeniser."""
  backend = transformers.BertTokenizer(do_lower_case=lowercase).backend_tokenizer
  return lambda text: [word for word, _ in backend.pre_tokenizer.pre_tokenize_str(
      backend.normalizer.normalize_str(text))]


def starting_pieces(words):
  return sorted({w[0] for w in words}) + sorted({'##' + c for w in words for c in w[1:]})


def naive_train(texts, vocab_size, lowercase, special_tokens):
  """Recounts every frequency before each merge; same score and tie-break as the trainer."""
  split = bert_words(lowercase)
  word_counts = collections.Counter(w for text in texts for w in split(text) if len(w) <= 100)
  words = {tuple([w[0]] + ['##' + c for c in w[1:]]): n for w, n in word_counts.items()}
  vocabulary = list(special_tokens)
  vocabulary += [p for p in starting_pieces(word_counts) if p not in vocabulary]
  while len(vocabulary) < vocab_size:
    symbol_freq, pair_freq = collections.Counter(), collections.Counter()
    for word, n in words.items():
      for symbol in word:
        symbol_freq[symbol] += n
      for pair in zip(word, word[1:]):
        pair_freq[pair] += n
    if not pair_freq:
      break
    best = min(pair_freq, key=lambda p: (-(pair_freq[p] / (symbol_freq[p[0]] * symbol_freq[p[1]])),
                                         -pair_freq[p], p))
    merged = best[0] + best[1][2:]
    if merged not in vocabulary:
      vocabulary.append(merged)
    merged_words = {}
    for word, n in words.items():
      parts, i = [], 0
      while i < len(word):
        if word[i:i + 2] == best:
          parts.append(merged)
          i += 2
        else:
          parts.append(word[i])
          i += 1
      merged_words[tuple(parts)] = merged_words.get(tuple(parts), 0) + n
    words = merged_words
  return vocabulary


def trained_vocab(rng, lowercase, n_merges):
  texts = random_corpus(rng, 20, TRAINED_ALPHABETS)
  split = bert_words(lowercase)
  n_start = len(wordpiece.BERT_SPECIAL_TOKENS) + len(starting_pieces(
      [w for text in texts for w in split(text)]))
  vocab = wordpiece.train_wordpiece(texts, n_start + n_merges, lowercase=lowercase)
  return vocab + [p for p in HAND_PICKED if p not in vocab]


@pytest.mark.parametrize('lowercase', [True, False])
def test_basic_tokenize_matches_bert(rng, lowercase):
  split = bert_words(lowercase)
  for text in random_corpus(rng, 30, TRAINED_ALPHABETS + UNTRAINED_ALPHABETS):
    assert wordpiece.basic_tokenize(text, lowercase=lowercase) == split(text), repr(text)


@pytest.mark.parametrize('lowercase', [True, False])
def test_ids_match_bert_tokenizer(rng, tmp_path, lowercase):
  path = wordpiece.WordPieceTokenizer(trained_vocab(rng, lowercase, 120)).save(
      str(tmp_path / 'vocab.txt'))
  ours = wordpiece.WordPieceTokenizer(path, lowercase=lowercase)
  reference = transformers.BertTokenizer(path, do_lower_case=lowercase)
  unknown = ours.encode_single_token('[UNK]')
  n_unknown = n_continued = 0
  for _ in range(30):
    # Around BERT's limit of 100 characters a word.
    long_word = 'a' * int(rng.integers(98, 103))
    text = random_text(rng, 30, TRAINED_ALPHABETS + UNTRAINED_ALPHABETS) + ' ' + long_word
    expected = reference.convert_tokens_to_ids(reference.tokenize(text))
    assert ours.encode_ordinary(text) == expected, repr(text)
    assert ours.tokenize(text) == reference.tokenize(text)
    n_unknown += expected.count(unknown)
    n_continued += sum(piece.startswith('##') for piece in reference.tokenize(text))
  assert n_unknown and n_continued  # Both outcomes of the greedy match were exercised.


def test_special_token_names_in_text_are_ordinary_text(rng, tmp_path):
  path = wordpiece.WordPieceTokenizer(trained_vocab(rng, True, 60)).save(
      str(tmp_path / 'vocab.txt'))
  ours = wordpiece.WordPieceTokenizer(path)
  reference = transformers.BertTokenizer(path, split_special_tokens=True)
  special_ids = {ours.special_ids[name] for name in SPECIAL_NAMES}
  for _ in range(20):
    runs = [random_text(rng, 2, TRAINED_ALPHABETS) for _ in range(4)]
    names = rng.choice(SPECIAL_NAMES + ['[UNK]', '[mask]'], 3)
    text = ''.join(run + name for run, name in zip(runs, names)) + runs[-1]
    ids = ours.encode_ordinary(text)
    assert ids == reference.convert_tokens_to_ids(reference.tokenize(text)), repr(text)
    assert not special_ids & set(ids)


@pytest.mark.parametrize('lowercase', [True, False])
def test_trainer_matches_naive_recount(rng, lowercase):
  special_tokens = ('[UNK]', '<s>', '</s>')
  for _ in range(3):
    texts = random_corpus(rng, 8, TRAINED_ALPHABETS + UNTRAINED_ALPHABETS)
    texts.append('b' * int(rng.integers(95, 106)))  # Left out when over 100 characters.
    words = [w for text in texts for w in bert_words(lowercase)(text)]
    vocab_size = len(special_tokens) + len(starting_pieces(words)) + int(rng.integers(20, 120))
    expected = naive_train(texts, vocab_size, lowercase, special_tokens)
    trained = wordpiece.train_wordpiece(texts, vocab_size, lowercase=lowercase,
                                        special_tokens=special_tokens)
    assert trained == expected


def test_trainer_stops_when_every_word_is_one_piece(rng):
  texts = random_corpus(rng, 3, ['abc', ' ', '.,'])
  vocab = wordpiece.train_wordpiece(texts, 10_000, lowercase=True)
  assert vocab == naive_train(texts, 10_000, True, wordpiece.BERT_SPECIAL_TOKENS)
  assert len(vocab) < 10_000


@pytest.mark.parametrize('lowercase', [True, False])
def test_decode_joins_basic_words(rng, lowercase):
  texts = random_corpus(rng, 10, TRAINED_ALPHABETS + UNTRAINED_ALPHABETS)
  split = bert_words(lowercase)
  n_start = len(wordpiece.BERT_SPECIAL_TOKENS) + len(starting_pieces(
      [w for text in texts for w in split(text)]))
  # Every character is a piece, so every word is covered.
  tokenizer = wordpiece.WordPieceTokenizer(
      wordpiece.train_wordpiece(texts, n_start + 50, lowercase=lowercase), lowercase=lowercase)
  for text in texts:
    ids = tokenizer.encode_ordinary(text)
    assert tokenizer.encode_single_token('[UNK]') not in ids
    assert tokenizer.decode(ids) == ' '.join(split(text))


def test_decode_of_ids_outside_the_vocabulary(rng):
  tokenizer = wordpiece.WordPieceTokenizer(['[UNK]', 'ab', '##c', 'd'])
  outside = int(rng.integers(4, 1000))
  assert tokenizer.decode([1, 2, outside, 3, 2]) == 'abc \ufffd dc'
  with pytest.raises(DataError, match=f'token id {outside} is outside'):
    tokenizer.decode([1, outside], errors='strict')


def test_interface(rng):
  pieces = ['[PAD]', '[UNK]', '[CLS]', '[SEP]', '[MASK]'] + [f'p{i}' for i in range(20)]
  order = rng.permutation(len(pieces))
  tokenizer = wordpiece.WordPieceTokenizer([pieces[i] for i in order], lowercase=False)
  assert tokenizer.n_vocab == len(pieces)
  assert tokenizer.special_ids == {pieces[i]: position for position, i in enumerate(order)
                                   if i < 5}
  assert tokenizer.encode_single_token('[MASK]') == list(order).index(4)
  with pytest.raises(DataError, match="'nope' is not a piece"):
    tokenizer.encode_single_token('nope')
  assert tokenizer.name != wordpiece.WordPieceTokenizer(pieces, lowercase=False).name


def random_pieces(rng, n):
  letters = list('abcdefghij')
  return ['[UNK]'] + list(dict.fromkeys(
      ('##' if rng.random() < 0.5 else '') + ''.join(rng.choice(letters, 6))
      for _ in range(n)))


@pytest.mark.parametrize('corruption, problem', [
    ('duplicate', r"piece '.*' repeats line \d+"),
    ('no unknown', r'has no \[UNK\] piece'),
    ('empty line', 'is empty or holds whitespace'),
    ('space inside', 'is empty or holds whitespace'),
])
def test_bad_vocab_file(rng, tmp_path, corruption, problem):
  pieces = random_pieces(rng, 30)
  at = int(rng.integers(1, len(pieces)))
  if corruption == 'duplicate':
    pieces.insert(at, pieces[int(rng.integers(at))])
  elif corruption == 'no unknown':
    pieces.remove('[UNK]')
  elif corruption == 'empty line':
    pieces.insert(at, '')
  else:
    pieces[at] = pieces[at][:2] + ' ' + pieces[at][2:]
  path = tmp_path / 'vocab.txt'
  path.write_text(''.join(p + '\n' for p in pieces), encoding='utf-8')
  with pytest.raises(DataError, match=problem) as raised:
    wordpiece.WordPieceTokenizer(str(path))
  assert str(path) in str(raised.value)
  if corruption != 'no unknown':
    assert f'line {at + 1}:' in str(raised.value)


def test_unreadable_vocab_files(tmp_path):
  with pytest.raises(DataError, match='no vocabulary file at'):
    wordpiece.WordPieceTokenizer(str(tmp_path / 'missing.txt'))
  latin1 = tmp_path / 'latin1.txt'
  latin1.write_bytes('[UNK]\ncafé\n'.encode('latin-1'))
  with pytest.raises(DataError, match='is not UTF-8'):
    wordpiece.WordPieceTokenizer(str(latin1))


def test_save_never_overwrites_unless_asked(rng, tmp_path):
  pieces, other = random_pieces(rng, 20), random_pieces(rng, 10)
  path = str(tmp_path / 'vocab.txt')
  wordpiece.WordPieceTokenizer(pieces).save(path)
  with pytest.raises(DataError, match='already exists'):
    wordpiece.WordPieceTokenizer(other).save(path)
  assert wordpiece.WordPieceTokenizer(path).pieces == pieces
  wordpiece.WordPieceTokenizer(other).save(path, overwrite=True)
  assert wordpiece.WordPieceTokenizer(path).pieces == other
  assert os.listdir(tmp_path) == ['vocab.txt']


def test_trainer_rejects_bad_arguments(rng):
  texts = random_corpus(rng, 2, ['abc', ' '])
  with pytest.raises(DataError, match='too small'):
    wordpiece.train_wordpiece(texts, 6, lowercase=True)
  with pytest.raises(DataError, match='no words'):
    wordpiece.train_wordpiece([' \t\x00'], 100, lowercase=True)
  with pytest.raises(DataError, match='could come out of ordinary text'):
    wordpiece.train_wordpiece(texts, 100, lowercase=True, special_tokens=('[UNK]', 'cls'))
  with pytest.raises(DataError, match='repeat'):
    wordpiece.train_wordpiece(texts, 100, lowercase=True, special_tokens=('[UNK]', '[UNK]'))
