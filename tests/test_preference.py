"""Preference pairs and the objectives that learn from them: the pairs' tokens and masks, the
synthetic arithmetic task, the reward model's and DPO's batch losses against per-sequence
numpy computations, short training runs, and bad input."""
import dataclasses
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from conftest import small_config
from lmlab.data import arithmetic, preferences
from lmlab.data.chat_template import chat_template, render
from lmlab.data.errors import DataError
from lmlab.models import registry
from lmlab.training.config import TrainConfig
from lmlab.training.language_modeling import load_run_tokenizer
from lmlab.training import rollouts
from lmlab.training import run as run_lib
from lmlab.training.loop import train
from lmlab.training.optimizer import OptimizerConfig
from lmlab.training.preference import DirectPreference, RewardModelling

VOWELS, CONSONANTS = 'aeiou', 'bcdfghk'


def word(rng, letters, low=2, high=5):
  return ''.join(rng.choice(list(letters), rng.integers(low, high)))


def vowel_pairs(rng, n: int) -> list[dict]:
  """Pairs whose chosen reply is a word of vowels, the rejected one of consonants."""
  return [{'prompt': word(rng, VOWELS + CONSONANTS), 'chosen': word(rng, VOWELS),
           'rejected': word(rng, CONSONANTS)} for _ in range(n)]


def write_jsonl(path, lines):
  path.write_text(''.join((line if isinstance(line, str) else json.dumps(line)) + '\n'
                          for line in lines), encoding='utf-8')
  return str(path)


def test_each_side_is_the_prompt_then_the_reply_with_the_mask_on_the_reply(tmp_path, rng):
  conversation = [{'role': 'user', 'content': word(rng, VOWELS)},
                  {'role': 'assistant', 'content': word(rng, CONSONANTS)},
                  {'role': 'user', 'content': word(rng, VOWELS)}]
  chosen, rejected = word(rng, VOWELS), word(rng, CONSONANTS)
  data = write_jsonl(tmp_path / 'pairs.jsonl', [
      {'prompt': conversation[0]['content'], 'chosen': chosen, 'rejected': rejected,
       'margin': 1.5},
      {'prompt': conversation, 'chosen': [{'role': 'assistant', 'content': chosen}],
       'rejected': [{'role': 'assistant', 'content': rejected}], 'source': 'ignored'}])
  config = TrainConfig(workdir=str(tmp_path / 'run'), objective='dpo', data=data)
  tokenizer = load_run_tokenizer(config.resolved(small_config()))
  template = chat_template('chatml')
  pairs = preferences.encode_pairs(preferences.read_pairs(data), template, tokenizer)
  assert [pair.margin for pair in pairs] == [1.5, 0.0]
  for pair, prompt in zip(pairs, (conversation[:1], conversation)):
    context = tokenizer.encode(render(template, prompt, add_generation_prompt=True),
                               allowed_special='all')
    for encoded, reply in ((pair.chosen, chosen), (pair.rejected, rejected)):
      reply_ids = tokenizer.encode(reply + '<|im_end|>', allowed_special='all')
      assert encoded.token_ids.tolist() == context + reply_ids
      assert encoded.loss_mask.tolist() == [False] * len(context) + [True] * len(reply_ids)


BAD_PAIRS = {
    'no "chosen" reply': {'prompt': 'a', 'rejected': 'b'},
    '"rejected" reply is empty': {'prompt': 'a', 'chosen': 'b', 'rejected': ' '},
    '"chosen" and "rejected" are the same': {'prompt': 'a', 'chosen': 'b', 'rejected': 'b'},
    '"margin" is -1': {'prompt': 'a', 'chosen': 'b', 'rejected': 'c', 'margin': -1},
    'no "prompt"': {'chosen': 'b', 'rejected': 'c'},
    'message 0 of "chosen" has the role': {'prompt': 'a', 'chosen': [{'role': 'x',
                                                                      'content': 'b'}],
                                           'rejected': 'c'},
    'not an object': [1, 2],
    'not JSON': '{"prompt": ',
}


def test_bad_pairs_are_errors_naming_file_and_line(tmp_path, rng):
  good = vowel_pairs(rng, 3)
  for problem, line in BAD_PAIRS.items():
    path = tmp_path / 'pairs.jsonl'
    write_jsonl(path, [*good, line, *good])
    with pytest.raises(DataError, match=f'^{path}:4: .*{problem}'):
      preferences.read_pairs(str(path))


def test_arithmetic_task_judges_sums_exactly(rng):
  problems = arithmetic.problems()
  assert sorted(problems) == [(a, b) for a in range(100) for b in range(100)]
  for a, b in rng.integers(0, 100, (50, 2)):
    prompt = arithmetic.prompt_of(a, b)
    assert arithmetic.reward(prompt, f' {a + b} ') == 1.0
    assert arithmetic.reward(prompt, str(a + b + int(rng.integers(1, 5)))) == 0.0
    wrong = arithmetic.wrong_answer(a, b, rng)
    assert wrong >= 0 and wrong != a + b
  examples = arithmetic.preference_examples()
  assert all(arithmetic.reward(e['prompt'], e['chosen']) == 1.0
             and arithmetic.reward(e['prompt'], e['rejected']) == 0.0 for e in examples)
  with pytest.raises(DataError, match='not an arithmetic prompt'):
    arithmetic.reward('1+2', '3')


def objective(kind, tmp_path, rng, n_pairs=40, **fields):
  data = write_jsonl(tmp_path / 'pairs.jsonl', vowel_pairs(rng, n_pairs))
  config = TrainConfig(workdir=str(tmp_path / 'run'), objective=kind.name, data=data,
                       seq_len=32, batch_size=6, **fields)
  config = config.resolved(small_config(vocab_size=0)).validate()
  return kind(config, small_config(vocab_size=0), log=lambda *_: None)


def per_sequence_outputs(model, encoded):
  """The model's output on each sequence alone, unpadded: [T, V or 1] each."""
  run = nnx.jit(lambda model, tokens: model(tokens))
  return [np.asarray(run(model, jnp.asarray(e.token_ids[None])))[0] for e in encoded]


def drawn_pairs(task, batch):
  """The PreferencePairs of a training batch, found by their chosen tokens."""
  by_tokens = {tuple(p.chosen.token_ids): p for p in task.train}
  return [by_tokens[tuple(row[:n])] for row, n in zip(batch['chosen_tokens'],
                                                       batch['chosen_length'])]


def test_reward_loss_reads_each_sides_score_at_its_last_token(tmp_path, rng):
  task = objective(RewardModelling, tmp_path, rng)
  assert task.model_config.n_labels == 1
  model = registry.build(task.model_config, rngs=nnx.Rngs(int(rng.integers(1000))))
  batch = task.train_batch(int(rng.integers(1000)))
  batch['margin'] = rng.uniform(0.0, 1.0, len(batch['margin'])).astype(np.float32)
  pairs = drawn_pairs(task, batch)
  chosen = np.asarray([s[-1, 0] for s in per_sequence_outputs(model, [p.chosen for p in pairs])])
  rejected = np.asarray([s[-1, 0] for s in per_sequence_outputs(model,
                                                                [p.rejected for p in pairs])])
  _, metrics = nnx.jit(lambda m, b: task.loss(m, b, None))(model, jax.tree.map(jnp.asarray,
                                                                                batch))
  z = chosen - rejected - batch['margin']
  np.testing.assert_allclose(metrics['loss'], np.mean(np.logaddexp(0.0, -z)), rtol=1e-4)
  np.testing.assert_allclose(metrics['margin'], np.mean(chosen - rejected), rtol=1e-4,
                             atol=1e-6)
  assert metrics['accuracy'] == np.mean(chosen > rejected)


def reply_logp(logits_tv, encoded):
  """log p of the reply's tokens (where the loss mask is on), from numpy's log-softmax."""
  logits = logits_tv.astype(np.float64)
  log_probs = logits - np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1,
                                                                                 keepdims=True)
                                ) - logits.max(-1, keepdims=True)
  positions = np.flatnonzero(encoded.loss_mask)
  return sum(log_probs[p - 1, encoded.token_ids[p]] for p in positions)


def test_dpo_batch_loss_is_the_formula_on_per_sequence_log_probabilities(tmp_path, rng):
  beta, alpha = float(rng.uniform(0.05, 1.0)), float(rng.uniform(0.1, 2.0))
  task = objective(DirectPreference, tmp_path, rng, beta=beta, rpo_alpha=alpha)
  model = registry.build(task.model_config, rngs=nnx.Rngs(int(rng.integers(1000))))
  reference = registry.build(task.model_config, rngs=nnx.Rngs(int(rng.integers(1000))))
  batch = task.train_batch(int(rng.integers(1000)))
  pairs = drawn_pairs(task, batch)
  logps = {}
  for name, m in (('policy', model), ('reference', reference)):
    for side in preferences.SIDES:
      encoded = [getattr(p, side) for p in pairs]
      logps[name, side] = np.asarray([reply_logp(out, e) for out, e in
                                      zip(per_sequence_outputs(m, encoded), encoded)])
  _, metrics = nnx.jit(lambda m, b, f: task.loss(m, b, None, f))(
      model, jax.tree.map(jnp.asarray, batch), nnx.state(reference))
  chosen = beta * (logps['policy', 'chosen'] - logps['reference', 'chosen'])
  rejected = beta * (logps['policy', 'rejected'] - logps['reference', 'rejected'])
  chosen_tokens = sum(int(p.chosen.loss_mask.sum()) for p in pairs)
  nll = -logps['policy', 'chosen'].sum() / chosen_tokens  # RPO's term (Pang et al. 2024).
  expected = {'loss': np.mean(np.logaddexp(0.0, -(chosen - rejected))) + alpha * nll,
              'nll_loss': nll,
              'rewards/chosen': chosen.mean(), 'rewards/rejected': rejected.mean(),
              'rewards/margins': (chosen - rejected).mean(),
              'rewards/accuracies': (chosen > rejected).mean(),
              'logps/chosen': logps['policy', 'chosen'].mean(),
              'logps/rejected': logps['policy', 'rejected'].mean()}
  for name, value in expected.items():
    np.testing.assert_allclose(metrics[name], value, rtol=2e-4, atol=1e-5, err_msg=name)


def short_run(tmp_path, rng, objective, steps, **fields):
  data = write_jsonl(tmp_path / f'{objective}.jsonl', vowel_pairs(rng, 400))
  config = TrainConfig(workdir=str(tmp_path / objective), objective=objective, data=data,
                       steps=steps, batch_size=16, seq_len=32, eval_every=1000,
                       save_every=1000, val_fraction=0.1, seed=int(rng.integers(1000)),
                       **fields)
  model = small_config(vocab_size=0, n_layers=1)
  return train(config, model, OptimizerConfig(learning_rate=3e-3, warmup_steps=5,
                                              total_steps=steps), print_fn=lambda *_: None)[3]


def test_a_reward_model_learns_which_reply_is_preferred_and_exports(tmp_path, rng):
  """Held-out pairs are ranked right; the exported folder scores padded rows as we do, in
  transformers, which finds each row's end by the pad_token_id written beside it."""
  summary = short_run(tmp_path, rng, 'reward', 60)
  assert summary['eval_accuracy'] >= 0.95, summary
  torch = pytest.importorskip('torch')
  transformers = pytest.importorskip('transformers')
  run_lib.workdir_to_hf(str(tmp_path / 'reward'), str(tmp_path / 'hf'))
  loaded = run_lib.restore(str(tmp_path / 'reward'))
  pad = json.loads((tmp_path / 'hf' / 'config.json').read_text())['pad_token_id']
  assert pad == loaded.tokenizer.encode_single_token('<|endoftext|>')
  ids = rng.integers(0, 256, (3, 12))
  lengths = rng.integers(1, 13, 3)
  ids[np.arange(12) >= lengths[:, None]] = pad
  ours = np.asarray(nnx.merge(loaded.graphdef, loaded.params)(jnp.asarray(ids)))[..., 0]
  reloaded = transformers.AutoModelForSequenceClassification.from_pretrained(
      str(tmp_path / 'hf')).eval()
  with torch.no_grad():
    theirs = reloaded(torch.tensor(ids)).logits.numpy()[:, 0]
  np.testing.assert_allclose(theirs, ours[np.arange(3), lengths - 1], atol=1e-4, rtol=0)
  # As another run's reward (--reward=<workdir>), it scores each padded row as that row alone.
  judged = rollouts.ModelReward(str(tmp_path / 'reward'), loaded.tokenizer)(None, None, ids,
                                                                           lengths)
  model = nnx.merge(loaded.graphdef, loaded.params)
  alone = [float(np.asarray(model(jnp.asarray(row[None, :n])))[0, -1, 0])
           for row, n in zip(ids, lengths)]
  np.testing.assert_allclose(judged, alone, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize('loss', ['sigmoid', 'simpo'])
def test_dpo_moves_the_policy_toward_the_chosen_replies(tmp_path, rng, loss):
  """At step 0 the policy is the reference: the loss is log 2 and the rewards are 0. Training
  raises the chosen replies' log-probability over the rejected ones'."""
  summary = short_run(tmp_path, rng, 'dpo', 30, dpo_loss=loss)
  if loss == 'sigmoid':
    assert summary['initial_eval_loss'] == pytest.approx(np.log(2.0), rel=1e-6)
  assert summary['eval_rewards/accuracies'] >= 0.95, summary
  assert summary['eval_loss'] < summary['initial_eval_loss'], summary


def test_a_reward_models_head_trains_beside_lora(tmp_path, rng):
  task = objective(RewardModelling, tmp_path, rng)
  config = dataclasses.replace(task.model_config, peft='lora')
  model = registry.build(config, rngs=nnx.Rngs(0))
  trained = {path for path, _ in nnx.to_flat_state(nnx.state(model, registry.trainable(config)))}
  assert ('score', 'kernel') in trained and ('embed', 'embedding') not in trained
