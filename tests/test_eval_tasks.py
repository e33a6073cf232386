"""The scoring engine and the built-in tasks against plain per-example computations: each
request scored alone, unpadded, by one call of the model, and the metrics' formulas
(bits per byte, LAMBADA's last-word accuracy, lm-evaluation-harness's acc and acc_norm)."""
import json
import math

import jax
import numpy as np
import pytest
from flax import nnx

from conftest import jit_call, small_config
from lmlab.data.errors import DataError
from lmlab.data.tokenizer import byte_tokenizer, separator_id
from lmlab.models.errors import ConfigError
from lmlab.models.registry import build
from lmlab.training import eval_tasks, scoring

WORDS = ['alpha', 'beta', 'gamma', 'λ', '数据', 'def', '(x)', 'ok.']


@pytest.fixture
def model(rng):
  config = small_config(vocab_size=320, max_seq_len=256)
  return build(config, rngs=nnx.Rngs(int(rng.integers(1 << 30))))


def alone(model, tokens, n_scored):
  """(sum of log p of the last n_scored tokens, all of them the argmax) from one call."""
  tokens = np.asarray(tokens)
  logits = jit_call(model)(tokens[None, :-1])[0].astype(np.float32)
  logp = jax.nn.log_softmax(logits, axis=-1)
  targets = tokens[1:]
  picked = np.asarray(logp)[np.arange(len(targets)), targets][-n_scored:]
  greedy = np.asarray(np.argmax(logits, axis=-1))[-n_scored:] == targets[-n_scored:]
  return float(picked.sum()), bool(greedy.all())


def words(rng, n):
  return ' '.join(rng.choice(WORDS, n))


def test_scorer_is_each_request_alone(model, rng):
  max_len = int(rng.integers(20, 40))
  requests = []
  for _ in range(11):  # Some longer than max_len + 1, so their oldest context is cut.
    tokens = tuple(int(t) for t in rng.integers(0, 320, int(rng.integers(2, 60))))
    requests.append(scoring.Request(tokens, int(rng.integers(1, min(len(tokens), 12)))))
  graphdef, params = nnx.split(model)
  scores = scoring.Scorer(graphdef, params, batch_size=4, max_len=max_len)(requests)
  for request, score in zip(requests, scores):
    logprob, greedy = alone(model, request.tokens[-(max_len + 1):], request.n_scored)
    assert score.logprob == pytest.approx(logprob, abs=1e-4, rel=1e-5)
    assert score.greedy == greedy


def test_rolling_windows_score_each_token_once_with_all_the_context_that_fits(rng):
  prefix = 999
  for _ in range(20):
    tokens = [int(t) for t in rng.integers(0, 300, int(rng.integers(1, 90)))]
    max_len = int(rng.integers(1, 30))
    windows = scoring.rolling(tokens, max_len, prefix)
    scored = [t for w in windows for t in w.tokens[len(w.tokens) - w.n_scored:]]
    assert scored == tokens
    stream, end = [prefix, *tokens], 1
    for window in windows:
      end += window.n_scored
      assert 1 <= window.n_scored <= max_len
      # The window is the max_len + 1 tokens that end its scored ones (or all there are).
      assert list(window.tokens) == stream[max(0, end - max_len - 1):end]
  assert scoring.rolling([], 8, prefix) == []


def test_pair_keeps_the_tokens_of_the_whole_text():
  tokenizer = byte_tokenizer()
  eot = separator_id(tokenizer)
  request = scoring.pair(tokenizer, 'one two ', 'three', eot)
  assert list(request.tokens) == tokenizer.encode_ordinary('one two three')
  assert request.n_scored == len(' three')
  empty = scoring.pair(tokenizer, '', 'x y', eot)
  assert list(empty.tokens) == [eot, *tokenizer.encode_ordinary('x y')]


def suite(tasks, texts=(), max_len=200, batch_size=3):
  return eval_tasks.Suite(tasks, byte_tokenizer(), lambda: list(texts), batch_size=batch_size,
                          max_len=max_len)


def test_bits_per_byte_and_perplexities(model, rng):
  tokenizer = byte_tokenizer()
  eot = separator_id(tokenizer)
  texts = [words(rng, int(rng.integers(3, 12))) + '\n' for _ in range(3)]
  graphdef, params = nnx.split(model)
  got = suite(eval_tasks.parse('bpb'), texts).run(graphdef, params)['bpb']
  # Each text fits in one window: its log-likelihood after end-of-text, in one call.
  encoded = [tokenizer.encode_ordinary(t) for t in texts]
  nll = -sum(alone(model, [eot, *e], len(e))[0] for e in encoded)
  n_bytes = sum(len(t.encode()) for t in texts)
  assert got['bits_per_byte'] == pytest.approx(nll / n_bytes / math.log(2), rel=1e-4)
  assert got['byte_perplexity'] == pytest.approx(2 ** got['bits_per_byte'], rel=1e-4)
  assert got['word_perplexity'] == pytest.approx(
      math.exp(nll / sum(len(t.split()) for t in texts)), rel=1e-4)
  # Bytes are this tokenizer's tokens.
  assert got['token_perplexity'] == pytest.approx(got['byte_perplexity'], rel=1e-4)


def test_lambada_style_and_multiple_choice(model, rng, tmp_path):
  tokenizer = byte_tokenizer()
  eot = separator_id(tokenizer)
  passages = [words(rng, int(rng.integers(2, 8))) for _ in range(7)]
  questions = [{'context': words(rng, int(rng.integers(0, 5))),
                'choices': [words(rng, int(rng.integers(1, 3))) for _ in range(3)],
                'label': int(rng.integers(3))} for _ in range(9)]
  for name, lines in (('passages', [{'text': p} for p in passages]), ('qa', questions)):
    (tmp_path / f'{name}.jsonl').write_text(''.join(json.dumps(x) + '\n' for x in lines))
  graphdef, params = nnx.split(model)
  got = suite(eval_tasks.parse(f'lambada_style:{tmp_path}/passages.jsonl,mc:{tmp_path}/qa.jsonl'),
              max_len=40).run(graphdef, params)

  def scored(context, continuation):
    whole = tokenizer.encode_ordinary(context + continuation)
    head = tokenizer.encode_ordinary(context) if context else []
    return alone(model, whole if context else [eot, *whole], len(whole) - len(head))

  last_words = [scored(context, ' ' + word)
                for context, word in (p.rsplit(' ', 1) for p in passages)]
  assert got['lambada_style_passages']['acc'] == pytest.approx(
      np.mean([greedy for _, greedy in last_words]))
  assert got['lambada_style_passages']['perplexity'] == pytest.approx(
      math.exp(-np.mean([logprob for logprob, _ in last_words])), rel=1e-4)
  right = right_norm = 0
  for q in questions:
    logprob = np.array([scored(q['context'], ' ' + c)[0] for c in q['choices']])
    right += np.argmax(logprob) == q['label']
    right_norm += np.argmax(logprob / [len(c) for c in q['choices']]) == q['label']
  assert got['mc_qa'] == {'acc': right / 9, 'acc_norm': right_norm / 9}


def test_bad_tasks_and_files(tmp_path):
  with pytest.raises(ConfigError, match="unknown task 'nope'"):
    eval_tasks.parse('bpb,nope')
  with pytest.raises(ConfigError, match='a task named twice'):
    eval_tasks.parse('bpb,bpb')
  with pytest.raises(DataError, match='missing.jsonl does not exist'):
    eval_tasks.parse(f'mc:{tmp_path}/missing.jsonl')
  good = {'context': 'a', 'choices': ['b', 'c'], 'label': 1}
  for line, message in [('{"context": "a", ', 'line 3: not JSON'),
                        (json.dumps({**good, 'choices': ['b']}), 'line 3: needs "choices"'),
                        (json.dumps({**good, 'label': 'b'}), 'line 3: needs "label"'),
                        (json.dumps({**good, 'label': 2}), 'line 3: label 2 is not an index')]:
    path = tmp_path / 'bad.jsonl'  # Its blank line 2 is skipped.
    path.write_text(f'{json.dumps(good)}\n\n{line}\n')
    with pytest.raises(DataError, match=message):
      eval_tasks.parse(f'mc:{path}')


def test_evaluation_text_ends_within_the_token_budget(rng, tmp_path):
  """The text stops at the last line break within the budget, or, in a first line longer than
  the budget, at the budget itself on a whole character (byte tokens: one byte each)."""
  from lmlab.data.corpus import Document
  budget = int(rng.integers(20, 60))
  lines = tmp_path / 'lines.txt'
  lines.write_text('ab\n' * 40, encoding='utf-8')
  assert eval_tasks.evaluation_text([Document(str(lines), 'lines.txt')], byte_tokenizer(),
                                    budget) == ['ab\n' * (budget // 3)]
  long_line = tmp_path / 'long.txt'
  long_line.write_text('λ' * 100, encoding='utf-8')  # Two bytes each.
  assert eval_tasks.evaluation_text([Document(str(long_line), 'long.txt')], byte_tokenizer(),
                                    budget) == ['λ' * (budget // 2)]
