"""Tokenizer, corpus split, token cache and batches."""
import os

import numpy as np
import pytest

from lmlab.data.errors import DataError
from lmlab.data import batches, corpus, token_cache
from lmlab.data.tokenizer import END_OF_TEXT, byte_tokenizer, load_tokenizer


def random_unicode(rng, n):
  # Any code point but the surrogates, which UTF-8 cannot carry.
  points = rng.integers(0, 0x110000, n)
  points = points[(points < 0xD800) | (points > 0xDFFF)]
  return ''.join(map(chr, points)) + '中文 emoji 🙂 e\u0301 \x00 <|endoftext|>'


def test_byte_tokenizer_round_trips_any_unicode(rng):
  tokenizer = byte_tokenizer()
  text = random_unicode(rng, 300)
  ids = tokenizer.encode_ordinary(text)
  assert ids == list(text.encode('utf-8'))  # One token per UTF-8 byte.
  assert tokenizer.decode(ids) == text


def test_special_token_is_never_produced_from_text():
  tokenizer = byte_tokenizer()
  eot = tokenizer.encode_single_token(END_OF_TEXT)
  assert eot == 256 and tokenizer.n_vocab == 257
  assert eot not in tokenizer.encode_ordinary('a <|endoftext|> b')


def test_unknown_tokenizer_is_an_error():
  with pytest.raises(DataError, match='neither bytes'):
    load_tokenizer('nope')


def write_files(root, contents):
  for name, text in contents.items():
    path = os.path.join(root, name)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, 'wb') as f:
      f.write(text if isinstance(text, bytes) else text.encode('utf-8'))


def test_split_is_deterministic_disjoint_and_covers_every_file(tmp_path, rng):
  names = {f'd{i % 3}/f{i}.txt': f'text {i} ' * int(rng.integers(1, 20)) for i in range(40)}
  write_files(tmp_path, names)
  write_files(tmp_path, {'empty.txt': ''})
  first = corpus.split_corpus(str(tmp_path), 0.2)
  again = corpus.split_corpus(str(tmp_path), 0.2)
  assert first == again
  train = {d.relpath for d in first['train']}
  val = {d.relpath for d in first['val']}
  assert not train & val and train | val == set(names)
  assert 1 <= len(val) < 20


def test_single_file_is_split_inside_at_a_character_boundary(tmp_path):
  text = 'é' * 1001  # Two bytes per character; 5% of the bytes is an odd offset.
  write_files(tmp_path, {'one.txt': text})
  splits = corpus.split_corpus(str(tmp_path / 'one.txt'), 0.05)
  train_pieces = list(corpus.text_chunks(splits['train'][0]))
  val_pieces = list(corpus.text_chunks(splits['val'][0]))
  assert not any(bad for _, bad in train_pieces + val_pieces)  # No character was cut.
  val_text = ''.join(t for t, _ in val_pieces)
  assert ''.join(t for t, _ in train_pieces) + val_text == text and val_text


def test_default_corpus_is_the_stdlib_without_tests():
  root, files = corpus.stdlib_files()
  assert len(files) > 100 and all(f.endswith('.py') for f in files)
  parts = {p for f in files for p in os.path.relpath(f, root).split(os.sep)[:-1]}
  assert not parts & {'test', 'tests', 'idlelib', 'site-packages'}


def test_missing_or_empty_data_is_an_error(tmp_path):
  with pytest.raises(DataError, match='no such file'):
    corpus.split_corpus(str(tmp_path / 'missing'), 0.1)
  write_files(tmp_path, {'a.txt': ''})
  with pytest.raises(DataError, match='no non-empty files'):
    corpus.split_corpus(str(tmp_path), 0.1)


def test_token_cache_holds_each_document_then_end_of_text(tmp_path, rng, capsys):
  contents = {f'f{i}.txt': random_unicode(rng, 30) for i in range(12)}
  contents['bad.txt'] = b'ok \xff\xfe bytes'
  write_files(tmp_path / 'corpus', contents)
  splits = corpus.split_corpus(str(tmp_path / 'corpus'), 0.3)
  tokenizer = byte_tokenizer()
  loaded = token_cache.load_splits(splits, tokenizer, str(tmp_path / 'cache'),
                                   tokenizer_id='bytes', log=lambda _: 0)
  for name, docs in splits.items():
    expected = []
    for doc in docs:
      raw = contents[doc.relpath]
      text = raw.decode('utf-8', errors='replace') if isinstance(raw, bytes) else raw
      expected += tokenizer.encode_ordinary(text) + [256]
    assert np.asarray(loaded[name]).tolist() == expected
  assert 'not UTF-8' in capsys.readouterr().err
  # A second load reuses the cache instead of tokenising again.
  again = token_cache.load_splits(splits, tokenizer, str(tmp_path / 'cache'),
                                  tokenizer_id='bytes', log=lambda msg: pytest.fail(msg))
  assert np.array_equal(again['train'], loaded['train'])


def test_train_batch_is_a_pure_function_of_seed_and_step(rng):
  tokens = rng.integers(0, 1000, 5000).astype(np.uint16)
  seed, step = int(rng.integers(1 << 30)), int(rng.integers(1 << 20))
  first, again, later = (batches.train_batch(tokens, seed=seed, step=s, batch_size=4, seq_len=32,
                                             end_token=7) for s in (step, step, step + 1))
  assert first.keys() == again.keys() == {'inputs', 'targets', 'segment_ids', 'positions'}
  assert all(np.array_equal(first[k], again[k]) for k in first)
  assert not np.array_equal(first['inputs'], later['inputs'])
  x1, y1 = first['inputs'], first['targets']
  assert x1.shape == (4, 32) and x1.dtype == np.int32
  assert np.array_equal(x1[:, 1:], y1[:, :-1])
  text = tokens.tobytes()
  for row in x1:  # Every row is a contiguous window of the stream.
    assert row.astype(np.uint16).tobytes() in text


def test_eval_batches_are_disjoint_windows(rng):
  tokens = np.arange(int(rng.integers(500, 2000)), dtype=np.uint16)
  seen = []
  for batch in batches.eval_batches(tokens, batch_size=3, seq_len=16, max_batches=5):
    x, y = batch['inputs'], batch['targets']
    assert np.array_equal(x + 1, y)
    seen += [row[0] for row in x]
  assert len(seen) == 15 and np.all(np.diff(seen) >= 16) and seen[-1] + 17 <= len(tokens)


def test_too_short_split_is_an_error():
  with pytest.raises(DataError, match='fewer than seq_len'):
    batches.check_length(np.zeros(10), 10, 'validation')


def test_document_segments_restart_after_each_end_token(rng):
  end = 0
  inputs = rng.integers(0, 4, (3, 20)).astype(np.int32)  # About a quarter are end tokens.
  segment_ids, positions = batches.document_segments(inputs, end)
  for row, segments, pos in zip(inputs, segment_ids, positions):
    segment, position = 0, 0
    for i, token in enumerate(row):
      assert segments[i] == segment and pos[i] == position
      position += 1
      if token == end:
        segment, position = segment + 1, 0


def test_chunked_tokenisation_equals_whole_file_encoding(tmp_path, rng):
  """Tokenising in small chunks gives what encoding each whole document gives."""
  words = ['def', 'x', '  ', '\n', '\n\n', ' ', 'é', '中文', '🙂', '\t', '1234', 'λ']
  contents = {f'f{i}.txt': ''.join(rng.choice(words, int(rng.integers(100, 2000))))
              for i in range(4)}
  write_files(tmp_path / 'corpus', contents)
  docs = corpus.split_corpus(str(tmp_path / 'corpus'), 0.3)['train']
  tokenizer = byte_tokenizer()
  path = str(tmp_path / 'train.bin')
  token_cache._write_split(docs, tokenizer, path, np.uint16, batch_bytes=37)
  for doc in docs:
    pieces = list(corpus.text_chunks(doc, chunk_bytes=int(rng.integers(8, 64))))
    assert ''.join(text for text, _ in pieces) == contents[doc.relpath]
  expected = []
  for doc in docs:
    expected += tokenizer.encode_ordinary(contents[doc.relpath]) + [256]
  assert np.fromfile(path, np.uint16).tolist() == expected
