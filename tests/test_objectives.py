"""BERT and sequence-to-sequence batches against the rules that define them."""
import math

import numpy as np
import pytest

from lmlab.data.errors import DataError
from lmlab.data.mlm import NOT_SELECTED, BertBatches, BertSpecials, mask_tokens
from lmlab.data.seq2seq import (SYNTHETIC_TASKS, Seq2SeqSpecials, read_pairs_tsv, sample_batch,
                                seq2seq_batch, synthetic_pairs)

SPECIALS = BertSpecials(pad=0, cls=1, sep=2, mask=3)
ORDINARY = np.arange(10, 200)


def within(observed: int, n: int, p: float, sigmas: float = 5.0) -> bool:
  return abs(observed - n * p) <= sigmas * math.sqrt(n * p * (1 - p))


def test_masking_proportions(rng):
  tokens = rng.choice(ORDINARY, 200_000)
  maskable = rng.random(tokens.shape) < 0.9
  masked, labels = mask_tokens(tokens, maskable, rng, mask_id=SPECIALS.mask,
                               replacement_ids=ORDINARY)
  selected = labels != NOT_SELECTED
  assert not np.any(selected & ~maskable)
  assert np.array_equal(labels[selected], tokens[selected])
  assert np.array_equal(masked[~selected], tokens[~selected])
  n = int(maskable.sum())
  assert within(int(selected.sum()), n, 0.15)
  k = int(selected.sum())
  to_mask = selected & (masked == SPECIALS.mask)
  unchanged = selected & (masked == tokens)
  replaced = selected & ~to_mask & ~unchanged
  assert within(int(to_mask.sum()), k, 0.8)
  # A random replacement equals the original 1 time in len(ORDINARY).
  p_same = 0.1 + 0.1 / len(ORDINARY)
  assert within(int(unchanged.sum()), k, p_same)
  assert within(int(replaced.sum()), k, 0.1 - 0.1 / len(ORDINARY))
  assert np.all(np.isin(masked[replaced], ORDINARY))


def contains(array, part) -> bool:
  """Whether `part` occurs in `array` as a contiguous run."""
  if len(part) > len(array):
    return False
  windows = np.lib.stride_tricks.sliding_window_view(array, len(part))
  return bool(np.any(np.all(windows == part, axis=1)))


def documents(rng, n=30):
  return [rng.choice(ORDINARY, int(rng.integers(1, 60))) for _ in range(n)]


def make_batches(docs, **kwargs):
  return BertBatches(docs, SPECIALS, seq_len=32, batch_size=64, seed=5,
                     replacement_ids=ORDINARY, **kwargs)


def test_pairs_have_the_bert_layout_and_balanced_labels(rng):
  docs = documents(rng)
  batches = make_batches(docs)
  labels = []
  for step in range(20):
    batch = batches.batch(step)
    for row in range(64):
      n = int(batch['attention_mask'][row].sum())
      assert np.all(batch['attention_mask'][row, :n] == 1)
      assert np.all(batch['inputs'][row, n:] == SPECIALS.pad)
      unmasked = np.where(batch['labels'][row] != NOT_SELECTED, batch['labels'][row],
                          batch['inputs'][row])[:n]
      seps = np.flatnonzero(unmasked == SPECIALS.sep)
      assert unmasked[0] == SPECIALS.cls and len(seps) == 2 and seps[1] == n - 1
      a, b = unmasked[1:seps[0]], unmasked[seps[0] + 1:n - 1]
      assert len(a) and len(b)
      types = batch['token_type_ids'][row, :n]
      assert np.all(types[:seps[0] + 1] == 0) and np.all(types[seps[0] + 1:] == 1)
      if batch['is_random_next'][row] == 0:  # B continues A inside one document.
        assert any(contains(d, np.concatenate([a, b])) for d in docs)
      labels.append(int(batch['is_random_next'][row]))
  assert within(sum(labels), len(labels), 0.5)


def test_a_random_next_sentence_comes_from_another_document(rng):
  """Each document draws from tokens of its own, so every token names its document."""
  vocabularies = np.array_split(ORDINARY, 6)  # Few documents: a slip to A's is likely.
  docs = [rng.choice(tokens, int(rng.integers(2, 80))) for tokens in vocabularies]
  owner = {int(token): i for i, tokens in enumerate(vocabularies) for token in tokens}
  batches = make_batches(docs)
  for step in rng.integers(1 << 20, size=3):
    batch = batches.batch(int(step))
    original = np.where(batch['labels'] != NOT_SELECTED, batch['labels'], batch['inputs'])
    for row, tokens in enumerate(original):
      a_end, b_end = np.flatnonzero(tokens == SPECIALS.sep)
      a_docs = {owner[int(t)] for t in tokens[1:a_end]}
      b_docs = {owner[int(t)] for t in tokens[a_end + 1:b_end]}
      assert len(a_docs) == len(b_docs) == 1
      assert (a_docs != b_docs) == bool(batch['is_random_next'][row])


def test_dynamic_masking_changes_and_static_masking_keeps_a_samples_mask(rng):
  docs = documents(rng)
  for dynamic in (True, False):
    batches = make_batches(docs, dynamic_masking=dynamic)
    batches.num_samples = 1  # Every row is sample 0.
    first, second = batches.batch(0), batches.batch(1)
    same = np.array_equal(first['inputs'], second['inputs'])
    assert same != dynamic
    assert np.array_equal(first['token_type_ids'], second['token_type_ids'])


def test_batches_are_a_pure_function_of_seed_and_step(rng):
  docs = documents(rng)
  step = int(rng.integers(1 << 20))
  a, b = make_batches(docs).batch(step), make_batches(docs).batch(step)
  assert all(np.array_equal(a[k], b[k]) for k in a)


def test_roberta_rows_are_full_length_spans_of_the_stream(rng):
  docs = documents(rng)
  batch = make_batches(docs, next_sentence=False).batch(3)
  stream = np.concatenate(docs)
  for row in range(64):
    tokens = np.where(batch['labels'][row] != NOT_SELECTED, batch['labels'][row],
                      batch['inputs'][row])
    assert tokens[0] == SPECIALS.cls and tokens[31] == SPECIALS.sep
    assert contains(stream, tokens[1:31])
  assert not batch['is_random_next'].any()


def test_too_little_data_for_pairs_is_an_error(rng):
  with pytest.raises(DataError, match='two or more'):
    make_batches([rng.choice(ORDINARY, 50)])


@pytest.mark.parametrize('task', sorted(SYNTHETIC_TASKS))
def test_synthetic_pairs_and_teacher_forcing(task, rng):
  specials = Seq2SeqSpecials(pad=0, bos=1, eos=2)
  pairs = synthetic_pairs(task, 50, seed=int(rng.integers(1 << 30)), first_id=3, n_symbols=20)
  for source, target in pairs:
    assert 8 <= len(source) <= 16
    expected = sorted(source) if task == 'sort' else list(reversed(source))
    assert list(target) == expected
  batch = sample_batch(pairs, specials, seed=1, step=2, batch_size=8, source_len=16,
                       target_len=17)
  for row in range(8):
    n_src = int(batch['source_mask'][row].sum())
    n_tgt = int(batch['target_mask'][row].sum())
    source = batch['source'][row, :n_src]
    target = batch['targets'][row, :n_tgt - 1]
    assert np.all(batch['source'][row, n_src:] == 0)
    assert batch['targets'][row, n_tgt - 1] == specials.eos
    assert batch['decoder_inputs'][row, 0] == specials.bos
    assert np.array_equal(batch['decoder_inputs'][row, 1:n_tgt], target)
    assert any(np.array_equal(source, s) and np.array_equal(target, t) for s, t in pairs)


def test_pairs_file(tmp_path):
  path = tmp_path / 'pairs.tsv'
  path.write_text('ab\tba\n\nxyz\tzyx\n', encoding='utf-8')
  pairs = read_pairs_tsv(str(path), lambda text: list(text.encode()))
  assert [list(s) for s, _ in pairs] == [[97, 98], [120, 121, 122]]
  path.write_text('no tab here\n', encoding='utf-8')
  with pytest.raises(DataError, match='pairs.tsv:1'):
    read_pairs_tsv(str(path), lambda text: list(text.encode()))
  with pytest.raises(DataError, match='does not fit'):
    seq2seq_batch([(np.arange(5), np.arange(5))], Seq2SeqSpecials(0, 1, 2), source_len=4,
                  target_len=8)
