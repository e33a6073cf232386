"""GRPO, rejection-sampling fine-tuning and PPO: rewards from a Python function, the sampled
batch against the generated tokens, GRPO's batch loss and PPO's returns against per-sequence
numpy log-probabilities, short runs that raise the reward, and bad input."""
import json
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from conftest import small_config
from lmlab.data.errors import DataError
from lmlab.models import registry
from lmlab.models.errors import ConfigError
from lmlab.training import rollouts
from lmlab.training.config import TrainConfig
from lmlab.training.loop import train
from lmlab.models import hf
from lmlab.training import run as run_lib
from lmlab.training.online import GroupRelative, ProximalPolicy, RejectionSampling
from lmlab.training.optimizer import OptimizerConfig
from test_main import assert_one_error_line, metrics, run_mains
from test_preference import BAD_PAIRS, vowel_pairs
from test_preference import write_jsonl as write_pairs

REWARDS = '''
def even(prompt, completion):
  """The share of the completion's characters with an even code point."""
  return sum(ord(c) % 2 == 0 for c in completion) / max(len(completion), 1)

def words(prompt, completion):
  return 'no number'

def fails(prompt, completion):
  raise ValueError('cannot judge')
'''


@pytest.fixture
def reward_module(tmp_path, monkeypatch, request):
  """A module of reward functions in the working directory, named after the test."""
  name = 'rewards_' + request.node.name.split('[')[0]
  (tmp_path / f'{name}.py').write_text(textwrap.dedent(REWARDS), encoding='utf-8')
  monkeypatch.chdir(tmp_path)
  return name


def write_prompts(path, rng, n=60):
  letters = list('abcdefgh')
  path.write_text(''.join(json.dumps({'prompt': ''.join(rng.choice(letters, 3))}) + '\n'
                          for _ in range(n)), encoding='utf-8')
  return str(path)


def test_reward_functions_and_their_errors(tmp_path, rng, reward_module):
  even = rollouts.PythonReward(f'{reward_module}:even')
  np.testing.assert_array_equal(even(['p', 'p'], ['bd', 'ab'], None, None), [1.0, 0.5])
  bad = {f'{reward_module}:words': (DataError, "returned 'no number'.*a finite number"),
         f'{reward_module}:fails': (DataError, 'raised ValueError \\(cannot judge\\)'),
         f'{reward_module}:absent': (ConfigError, "has no function 'absent'"),
         'no_such_module_here:f': (ConfigError, "importing 'no_such_module_here' failed"),
         'not a spec': (ConfigError, 'neither module:function nor')}
  for spec, (error, message) in bad.items():
    with pytest.raises(error, match=message):
      rollouts.PythonReward(spec)(['p'], ['c'], None, None)
  with pytest.raises(ConfigError, match='needs --reward'):
    rollouts.load_reward(None, str(tmp_path / 'prompts.jsonl'), None, 'p')
  path = tmp_path / 'prompts.jsonl'
  path.write_text('{"prompt": "a"}\n{"prompt": ""}\n', encoding='utf-8')
  with pytest.raises(DataError, match=f'{path}:2: expected an object with a non-empty'):
    rollouts.read_prompts(str(path))


def test_bad_pairs_and_a_failing_reward_stop_main_with_one_line_writing_nothing(
    tmp_path, rng, reward_module):
  """Both are found before the run writes anything (a reward function is tried on an empty
  completion first); the two runs go side by side."""
  pairs = write_pairs(tmp_path / 'pairs.jsonl', [
      *vowel_pairs(rng, 3), BAD_PAIRS['"chosen" and "rejected" are the same']])
  prompts = write_prompts(tmp_path / 'prompts.jsonl', rng)
  small = ['--set', 'n_layers=1', '--set', 'd_model=32', '--seq_len=32']
  dpo, grpo = run_mains(
      ['--objective=dpo', f'--data={pairs}', f'--workdir={tmp_path / "dpo"}', *small],
      ['--objective=grpo', f'--data={prompts}', f'--reward={reward_module}:words',
       f'--workdir={tmp_path / "grpo"}', '--batch_size=4', '--group_size=2',
       '--completion_tokens=4', *small], check=False, cwd=tmp_path)
  assert_one_error_line(dpo, 'pairs.jsonl:4: "chosen" and "rejected" are the same')
  assert_one_error_line(grpo, f"--reward={reward_module}:words returned 'no number'")
  assert not list((tmp_path / 'dpo').iterdir()) and not list((tmp_path / 'grpo').iterdir())


def objective(kind, tmp_path, rng, reward_module, **fields):
  data = write_prompts(tmp_path / 'prompts.jsonl', rng)
  config = TrainConfig(workdir=str(tmp_path / 'run'), objective=kind.name, data=data,
                       reward=f'{reward_module}:even', seq_len=32, completion_tokens=6,
                       batch_size=8, group_size=4, **fields)
  config = config.resolved(small_config(vocab_size=0)).validate()
  return kind(config, small_config(vocab_size=0), log=lambda *_: None)


def log_softmax(logits):
  logits = logits.astype(np.float64)
  top = logits.max(-1, keepdims=True)
  return logits - top - np.log(np.exp(logits - top).sum(-1, keepdims=True))


def numpy_logps(model, sequences):
  """log p of each token of sequences after the first [B, T-1], by numpy's log-softmax."""
  log_p = log_softmax(np.asarray(nnx.jit(lambda m, t: m(t))(model,
                                                            jnp.asarray(sequences[:, :-1]))))
  return np.take_along_axis(log_p, sequences[:, 1:, None], -1)[..., 0]


def test_grpo_batch_is_the_generated_completions_and_its_loss_the_formula(tmp_path, rng,
                                                                          reward_module):
  task = objective(GroupRelative, tmp_path, rng, reward_module, beta=0.1)
  model = registry.build(task.model_config, rngs=nnx.Rngs(int(rng.integers(1000))))
  reference = registry.build(task.model_config, rngs=nnx.Rngs(int(rng.integers(1000))))
  batch = task.train_batch(int(rng.integers(1000)), nnx.state(model))
  sequences, mask = batch['sequences'], batch['mask']
  end = task.sampler.end_token
  texts = []
  for row, row_mask in zip(sequences, mask):
    completion = row[row_mask == 1].tolist()
    assert end not in completion[:-1] and (completion[-1] == end or len(completion) == 6)
    prompt_ids = row[:np.flatnonzero(row_mask)[0]].tolist()
    assert task.tokenizer.decode(prompt_ids).endswith('<|im_start|>assistant\n')
    texts.append(task.tokenizer.decode([t for t in completion if t != end], errors='replace'))
  np.testing.assert_allclose(batch['rewards'], [
      sum(ord(c) % 2 == 0 for c in text) / max(len(text), 1) for text in texts], rtol=1e-6)
  groups = batch['rewards'].reshape(-1, 4)
  np.testing.assert_allclose(batch['advantages'].reshape(-1, 4), (
      groups - groups.mean(1, keepdims=True)) / (groups.std(1, ddof=1, keepdims=True) + 1e-4),
      rtol=1e-4, atol=1e-5)

  logps = {name: numpy_logps(m, sequences) for name, m in (('policy', model),
                                                            ('reference', reference))}
  completion = mask[:, 1:].astype(np.float64)
  log_ratio = logps['reference'] - logps['policy']
  k3 = np.exp(log_ratio) - log_ratio - 1
  per_token = -(batch['advantages'][:, None] - 0.1 * k3)  # The ratio to the sampler is 1.
  _, metrics = nnx.jit(lambda m, b, f: task.loss(m, b, None, f))(
      model, jax.tree.map(jnp.asarray, batch), nnx.state(reference))
  np.testing.assert_allclose(metrics['loss'], np.mean(
      (per_token * completion).sum(1) / completion.sum(1)), rtol=1e-4, atol=1e-6)
  np.testing.assert_allclose(metrics['kl'], (k3 * completion).sum() / completion.sum(),
                             rtol=1e-4)
  assert metrics['clip_fraction'] == 0.0


def short_run(tmp_path, rng, reward_module, objective, steps, **fields):
  data = write_prompts(tmp_path / 'prompts.jsonl', rng, n=200)
  config = TrainConfig(workdir=str(tmp_path / objective), objective=objective, data=data,
                       reward=f'{reward_module}:even', steps=steps, batch_size=32, seq_len=32,
                       completion_tokens=6, eval_every=1000, save_every=1000, log_every=1,
                       seed=int(rng.integers(1000)), **fields)
  optimizer = OptimizerConfig(learning_rate=1e-2, warmup_steps=2, total_steps=steps)
  summary = train(config, small_config(vocab_size=0, n_layers=1), optimizer,
                  print_fn=lambda *_: None)[3]
  rewards = [m['reward'] for m in metrics(str(tmp_path / objective)) if 'reward' in m]
  return summary, rewards


def test_grpo_raises_the_reward(tmp_path, rng, reward_module):
  summary, rewards = short_run(tmp_path, rng, reward_module, 'grpo', 24, group_size=8)
  assert np.mean(rewards[-4:]) > np.mean(rewards[:4]) + 0.2, rewards
  assert summary['eval_kl'] > 0 and 'eval_reward' in summary


def test_rejection_sampling_trains_on_the_best_sample_and_raises_the_reward(
    tmp_path, rng, reward_module):
  task = objective(RejectionSampling, tmp_path, rng, reward_module, min_reward=0.5)
  model = registry.build(task.model_config, rngs=nnx.Rngs(int(rng.integers(1000))))
  step = int(rng.integers(1000))
  batch = task.train_batch(step, nnx.state(model))
  _, samples, sample_mask, lengths, rewards = task._samples(step, nnx.state(model), 8, 4)
  best = rewards.reshape(8, 4).argmax(1) + 4 * np.arange(8)
  np.testing.assert_array_equal(batch['sequences'], samples[best])
  kept = rewards[best] >= 0.5
  np.testing.assert_array_equal(batch['mask'], sample_mask[best] * kept[:, None])

  _, rewards = short_run(tmp_path, rng, reward_module, 'rsft', 24, group_size=4)
  assert np.mean(rewards[-4:]) > np.mean(rewards[:4]) + 0.2, rewards


def test_ppo_returns_are_the_score_less_the_kl_penalty(tmp_path, rng, reward_module):
  """With γ = λ = 1 and the value head at zero (as it starts), the return from a completion's
  first token is its score minus β times its summed log-ratio to the reference."""
  beta = float(rng.uniform(0.05, 0.5))
  task = objective(ProximalPolicy, tmp_path, rng, reward_module, beta=beta, gamma=1.0,
                   gae_lambda=1.0)
  assert task.model_config.value_head
  model = registry.build(task.model_config, rngs=nnx.Rngs(int(rng.integers(1000))))
  reference = registry.build(task.model_config, rngs=nnx.Rngs(int(rng.integers(1000))))
  batch = task.train_batch(int(rng.integers(1000)), nnx.state(model))
  prepared = nnx.jit(lambda m, b, f: task.prepare(m, b, f))(
      model, jax.tree.map(jnp.asarray, batch), nnx.state(reference))
  completion = batch['mask'][:, 1:] == 1
  log_ratio = (numpy_logps(model, batch['sequences'])
               - numpy_logps(reference, batch['sequences'])) * completion
  np.testing.assert_allclose(np.asarray(prepared['kl']).sum(1), log_ratio.sum(1), rtol=1e-4,
                             atol=1e-5)
  first = completion.argmax(1)
  returns = np.asarray(prepared['returns'])[np.arange(len(first)), first]
  np.testing.assert_allclose(returns, batch['scores'] - beta * log_ratio.sum(1), rtol=1e-4,
                             atol=1e-5)


def test_ppo_raises_the_reward_and_exports_the_policy_alone(tmp_path, rng, reward_module):
  _, rewards = short_run(tmp_path, rng, reward_module, 'ppo', 40, ppo_epochs=2,
                         ppo_minibatches=2, grad_accum=2)
  # A step's mean reward varies by about 0.04 around its trend, so the mean of 10 steps by
  # about 0.013: a rise of 0.1 is learning, not noise. (Runs rise by 0.13 to 0.3.)
  assert np.mean(rewards[-10:]) > np.mean(rewards[:10]) + 0.1, rewards
  loaded = run_lib.restore(str(tmp_path / 'ppo'))
  run_lib.workdir_to_hf(str(tmp_path / 'ppo'), str(tmp_path / 'hf'))
  exported = hf.load(str(tmp_path / 'hf'))
  assert exported.value_head is None
  tokens = jnp.asarray(rng.integers(0, 256, (2, 9)))
  np.testing.assert_array_equal(np.asarray(exported(tokens)), np.asarray(
      nnx.merge(loaded.graphdef, loaded.params)(tokens)))


def test_a_resumed_grpo_run_repeats_the_uninterrupted_one(tmp_path, rng, reward_module):
  """A step's samples are a function of (seed, step, parameters): stopping after step 2 and
  resuming gives the same metrics, bit for bit."""
  data = write_prompts(tmp_path / 'prompts.jsonl', rng)
  seed = int(rng.integers(1000))

  def run(workdir, steps):
    config = TrainConfig(workdir=str(tmp_path / workdir), objective='grpo', data=data,
                         reward=f'{reward_module}:even', steps=steps, batch_size=8,
                         group_size=4, seq_len=32, completion_tokens=6, eval_every=1000,
                         save_every=2, log_every=1, seed=seed)
    train(config, small_config(vocab_size=0, n_layers=1),
          OptimizerConfig(learning_rate=1e-2, warmup_steps=1, total_steps=4),
          print_fn=lambda *_: None)

  run('whole', 4)
  run('halves', 2)
  run('halves', 4)
  losses = lambda workdir: {m['step']: (m['loss'], m['reward']) for m in
                            metrics(str(tmp_path / workdir)) if 'reward' in m}
  assert losses('halves') == losses('whole')


@pytest.mark.parametrize('fields, message', [
    (dict(objective='ppo', ppo_minibatches=3, grad_accum=2),
     '--ppo_minibatches=3 must be a positive divisor of --grad_accum=2'),
    (dict(objective='ppo', ppo_minibatches=0), '--ppo_minibatches=0 must be a positive'),
    (dict(objective='dpo', rpo_alpha=-0.5), '--rpo_alpha=-0.5 must be >= 0'),
    (dict(objective='grpo', group_size=1), '--group_size=1 must be at least 2'),
])
def test_bad_settings_are_one_error_naming_the_flag(fields, message):
  with pytest.raises(ConfigError, match=message):
    TrainConfig(workdir='unused', data='unused.jsonl', **fields).validate()
