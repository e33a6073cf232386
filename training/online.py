"""Objectives that learn from the policy's own samples: GRPO (objective 'grpo'),
rejection-sampling fine-tuning ('rsft') and PPO ('ppo'), on the prompts and rewards of
training/rollouts.py.

  python main.py --objective=grpo --data=synthetic:arithmetic --init_from=runs/sft \
      --workdir=runs/grpo --group_size=8 [--reward=module:function] [--grpo_loss=dr_grpo]
  python main.py --objective=rsft --data=synthetic:arithmetic --init_from=runs/sft \
      --workdir=runs/rsft --group_size=8 --min_reward=1
  python main.py --objective=ppo --data=synthetic:arithmetic --init_from=runs/sft \
      --workdir=runs/ppo --reward=runs/reward [--ppo_epochs=4 --beta=0.05]

Each step samples completions from the parameters it starts with (--sample_temperature, at
most --completion_tokens each) and judges them, then takes one optimizer update:
  grpo  --batch_size completions, --group_size per prompt: group-normalised advantages, the
        clipped surrogate with the k3 KL penalty (weight --beta) to the frozen reference (the
        run's initial parameters: the --init_from run), training/policy_losses.py. One update
        per rollout, so the ratio to the sampling policy is 1 and its clip never acts.
  rsft  --group_size samples for each of --batch_size prompts; the best of each (Llama 2's
        rejection sampling) trains with the SFT loss, unless its reward is below
        --min_reward. Iterating is taking more steps: later samples come from the improved
        policy.
  ppo   one completion for each of --batch_size prompts; the per-token KL penalty, the score
        at the last token, GAE advantages from a value head on the policy's trunk
        (value_head=true, zero at the start), then --ppo_epochs passes of the clipped
        surrogate and value losses over the rollout (training/policy_losses.py), each pass
        --ppo_minibatches updates on its groups of micro-batches in turn.
A step's batch is a pure function of (seed, step, parameters), so a resumed run repeats the
uninterrupted one. Metrics: reward (mean of the step's samples), reward_std, kl (mean k3 per
completion token; ppo: summed over the completion), entropy, completion_tokens,
clip_fraction (grpo, ppo), kept (rsft), policy_loss and value_loss (ppo).
Evaluation: each held-out prompt's greedy completion judged (eval_reward; eval_loss is its
negative) and one sampled completion's log-probability ratio to the reference summed over
its tokens (eval_kl, an estimate of KL(policy || reference) at the sampling temperature).
"""
import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from lmlab.data.chat_template import chat_template
from lmlab.data.errors import DataError
from lmlab.models.config import ModelConfig
from lmlab.models.errors import ConfigError
from lmlab.training import rollouts
from lmlab.training.config import TrainConfig
from lmlab.training.language_modeling import load_run_tokenizer
from lmlab.training.objective import Objective
from lmlab.training.policy_losses import gae, group_advantages, grpo_loss, ppo_loss, whiten
from lmlab.training.preference import picked_logps, token_logps
from lmlab.training.sft import chat_model_config, held_out_count, masked_cross_entropy


def _entropy(logits_btv, mask_bt):
  """Mean entropy of the next-token distributions where mask_bt is 1."""
  log_p_btv = jax.nn.log_softmax(logits_btv, axis=-1)
  entropy_bt = -jnp.sum(jnp.exp(log_p_btv) * log_p_btv, axis=-1)
  return jnp.sum(entropy_bt * mask_bt) / jnp.maximum(jnp.sum(mask_bt), 1)


class _Online(Objective):
  """Prompts, reward, sampling and evaluation; a subclass makes the batch from its samples."""
  online = True
  name = ''

  def __init__(self, train_config: TrainConfig, model_config: ModelConfig, *, log=print):
    if model_config.family != 'decoder' or model_config.n_labels:
      raise ConfigError(f'--objective={self.name} trains a language model (a decoder without a '
                        'score head)')
    if not train_config.data:
      raise DataError(f'--objective={self.name} needs --data=<file.jsonl> of prompts (or '
                      'synthetic:arithmetic)')
    self.config, self.log = train_config, log
    template = chat_template(train_config.chat_template)
    self.tokenizer = load_run_tokenizer(train_config)
    self.model_config = chat_model_config(model_config, self.tokenizer, train_config.seq_len)
    sampling = dict(max_tokens=train_config.completion_tokens, seq_len=train_config.seq_len)
    self.sampler = rollouts.Sampler(self.model_config, self.tokenizer, template,
                                    temperature=train_config.sample_temperature, **sampling)
    self.greedy = rollouts.Sampler(self.model_config, self.tokenizer, template,
                                   temperature=0.0, **sampling)
    self._read_prompts()
    self.reward = rollouts.load_reward(train_config.reward, train_config.data, self.tokenizer,
                                       self.prompts[self.train[0]])
    self.reference = None
    self._kl = {}

  def load_data(self):
    """The prompts are read in __init__: bad data stops the run before it writes."""

  def _read_prompts(self):
    prompts = rollouts.read_prompts(self.config.data)
    n_val = held_out_count(len(prompts), 'prompts', self.config)
    room = self.config.seq_len - self.config.completion_tokens
    ids = [self.sampler.prompt_ids(prompt) for prompt in prompts]
    fit = [i for i, prompt_ids in enumerate(ids) if len(prompt_ids) <= room]
    self.prompts, self.prompt_ids = prompts, ids
    self.train = [i for i in fit if i < len(prompts) - n_val]
    self.val = [i for i in fit if i >= len(prompts) - n_val]
    if not (self.train and self.val):
      raise DataError(f'no {"training" if not self.train else "held-out"} prompt of '
                      f'{self.config.data} fits --seq_len={self.config.seq_len} with '
                      f'--completion_tokens={self.config.completion_tokens}; raise --seq_len')
    left_out = len(prompts) - len(self.train) - len(self.val)
    self.log(f'{len(self.train)} training prompts, {len(self.val)} held out' + (
        f'; {left_out} too long for --seq_len - --completion_tokens are left out'
        if left_out else ''))
    self.draws = rollouts.PromptDraws([ids[i] for i in self.train])

  def frozen(self, params):
    """The reference: the run's initial parameters."""
    self.reference = params()
    return self.reference

  def _samples(self, step: int, params, n_prompts: int, per_prompt: int):
    """(prompt indices [P], sequences, completion mask, lengths, rewards [P * per_prompt]) of
    per_prompt completions of each of n_prompts prompts of one length, drawn from (seed,
    step) and sampled from params; a prompt's completions are consecutive rows."""
    rng = np.random.default_rng([self.config.seed, step])
    chosen = np.asarray(self.train)[self.draws.draw(rng, n_prompts)]
    prompt_ids = np.repeat(np.asarray([self.prompt_ids[i] for i in chosen], np.int32),
                           per_prompt, axis=0)
    key = jax.random.fold_in(jax.random.key(self.config.seed), step)
    sequences, mask, lengths, texts = self.sampler.sample(params, prompt_ids, key)
    prompts = [self.prompts[i] for i in chosen for _ in range(per_prompt)]
    return chosen, sequences, mask, lengths, self.reward(prompts, texts, sequences, lengths)

  def _length_batches(self, indices):
    """(rows, n real, prompt ids [--micro_batch_size, T]): prompt indices of one length, the
    n real ones then the last repeated to fill the batch (one compile per length)."""
    size = self.config.micro_batch_size
    by_length = {}
    for i in indices:
      by_length.setdefault(len(self.prompt_ids[i]), []).append(i)
    for same in by_length.values():
      for start in range(0, len(same), size):
        chunk = same[start:start + size]
        rows = chunk + [chunk[-1]] * (size - len(chunk))
        yield rows, len(chunk), np.asarray([self.prompt_ids[i] for i in rows], np.int32)

  def sample_replies(self, params, indices, seed: int, sampler=None) -> dict:
    """{index: a completion sampled from params} of each prompt, by `sampler` (default: at
    --sample_temperature)."""
    replies = {}
    for n, (rows, real, prompt_ids) in enumerate(self._length_batches(indices)):
      texts = (sampler or self.sampler).sample(
          params, prompt_ids, jax.random.fold_in(jax.random.key(seed), n))[3]
      replies.update(zip(rows[:real], texts))
    return replies

  def held_out_kl(self, graphdef, params) -> float:
    """The mean over the held-out prompts of the summed log-ratio to the reference of one
    completion sampled from params: a one-sample estimate of KL(policy || reference)."""
    if graphdef not in self._kl:

      def kl(params, reference, sequences, mask):
        logps, _ = token_logps(nnx.merge(graphdef, params), sequences)
        ref_logps, _ = token_logps(nnx.merge(graphdef, reference), sequences)
        return jnp.sum((logps - ref_logps) * mask[:, 1:], axis=1)

      self._kl[graphdef] = jax.jit(kl)
    kls = []
    for n, (_, real, prompt_ids) in enumerate(self._length_batches(self.val)):
      sampled, sampled_mask, _, _ = self.sampler.sample(
          params, prompt_ids, jax.random.fold_in(jax.random.key(self.config.seed), n))
      kls += list(np.asarray(self._kl[graphdef](params, self.reference, sampled,
                                                sampled_mask))[:real])
    return float(np.mean(kls))

  def evaluate(self, graphdef, params):
    """eval_reward of greedy completions and eval_kl of sampled ones over every held-out
    prompt (see the module docstring), batched by prompt length."""
    rewards, tokens = [], []
    for rows, real, prompt_ids in self._length_batches(self.val):
      prompts = [self.prompts[i] for i in rows]
      sequences, mask, lengths, texts = self.greedy.sample(params, prompt_ids, jax.random.key(0))
      rewards += list(self.reward(prompts, texts, sequences, lengths)[:real])
      tokens += list(mask.sum(axis=1)[:real])
    metrics = {'eval_loss': -float(np.mean(rewards)), 'eval_reward': float(np.mean(rewards)),
               'eval_completion_tokens': float(np.mean(tokens))}
    if self.reference is not None:
      metrics['eval_kl'] = self.held_out_kl(graphdef, params)
    return metrics


class GroupRelative(_Online):
  """GRPO: --group_size completions per prompt, their rewards normalised within the group."""
  name = 'grpo'

  def train_batch(self, step: int, params):
    g = self.config.group_size
    _, sequences, mask, _, rewards = self._samples(step, params, self.config.batch_size // g, g)
    advantages = np.asarray(group_advantages(jnp.asarray(rewards), g, self.config.grpo_loss))
    return {'sequences': sequences, 'mask': mask, 'rewards': rewards,
            'advantages': advantages.astype(np.float32)}

  def loss(self, model, batch, dropout_key, frozen=None):
    logps_bt, logits_btv = token_logps(model, batch['sequences'], dropout_key)
    mask_bt = batch['mask'][:, 1:].astype(jnp.float32)
    ref_logps_bt = None
    if frozen is not None:
      ref_logps_bt = jax.lax.stop_gradient(
          token_logps(nnx.merge(nnx.graphdef(model), frozen), batch['sequences'])[0])
    c = self.config
    loss, k3_bt, clipped_bt = grpo_loss(
        c.grpo_loss, logps_bt=logps_bt, old_logps_bt=jax.lax.stop_gradient(logps_bt),
        ref_logps_bt=ref_logps_bt, advantages_b=batch['advantages'], mask_bt=mask_bt,
        beta=c.beta, epsilon=c.clip_epsilon, max_tokens=c.completion_tokens)
    tokens = jnp.maximum(jnp.sum(mask_bt), 1)
    return loss, {'loss': loss, 'reward': jnp.mean(batch['rewards']),
                  'reward_std': jnp.std(batch['rewards']),
                  'kl': jnp.sum(k3_bt * mask_bt) / tokens,
                  'clip_fraction': jnp.sum(clipped_bt * mask_bt) / tokens,
                  'entropy': _entropy(jax.lax.stop_gradient(logits_btv), mask_bt),
                  'completion_tokens': tokens / mask_bt.shape[0]}


class RejectionSampling(_Online):
  """Rejection-sampling fine-tuning: the best of --group_size samples of each prompt."""
  name = 'rsft'

  def train_batch(self, step: int, params):
    g, b = self.config.group_size, self.config.batch_size
    _, sequences, mask, _, rewards = self._samples(step, params, b, g)
    best = np.argmax(rewards.reshape(b, g), axis=1) + g * np.arange(b)
    kept = rewards[best] >= (-np.inf if self.config.min_reward is None else
                             self.config.min_reward)
    return {'sequences': sequences[best], 'mask': mask[best] * kept[:, None],
            'rewards': rewards, 'kept': kept.astype(np.float32)}

  def loss(self, model, batch, dropout_key, frozen=None):
    del frozen
    logits_btv = model(batch['sequences'][:, :-1], dropout_key=dropout_key)
    mask_bt = batch['mask'][:, 1:]
    loss, count = masked_cross_entropy(logits_btv, batch['sequences'][:, 1:], mask_bt)
    return loss, {'loss': loss, 'trained_tokens': count, 'reward': jnp.mean(batch['rewards']),
                  'reward_std': jnp.std(batch['rewards']), 'kept': jnp.mean(batch['kept'])}


class ProximalPolicy(_Online):
  """PPO with a KL penalty to the reference, on one completion of each of --batch_size
  prompts; the critic is a value head on the policy's trunk (value_head=true)."""
  name = 'ppo'

  def __init__(self, train_config, model_config, *, log=print):
    super().__init__(train_config, dataclasses.replace(model_config, value_head=True), log=log)

  def train_batch(self, step: int, params):
    _, sequences, mask, lengths, scores = self._samples(step, params, self.config.batch_size, 1)
    return {'sequences': sequences, 'mask': mask, 'lengths': lengths, 'scores': scores}

  def prepare(self, model, batch, frozen):
    """The rollout's log-probabilities, values, rewards, advantages and returns, from the
    parameters the step starts with."""
    c = self.config
    logits_btv, values_bt = model(batch['sequences'][:, :-1], with_values=True)
    logps_bt = picked_logps(logits_btv, batch['sequences'])
    ref_logps_bt = token_logps(nnx.merge(nnx.graphdef(model), frozen), batch['sequences'])[0]
    mask_bt = batch['mask'][:, 1:].astype(jnp.float32)
    kl_bt = (logps_bt - ref_logps_bt) * mask_bt
    last_bt = jax.nn.one_hot(batch['lengths'] - 2, mask_bt.shape[1])  # Predicts the last token.
    rewards_bt = -c.beta * kl_bt + batch['scores'][:, None] * last_bt
    if c.whiten_rewards:
      rewards_bt = whiten(rewards_bt, mask_bt, shift_mean=False) * mask_bt
    advantages_bt, returns_bt = gae(rewards_bt, values_bt * mask_bt, mask_bt, gamma=c.gamma,
                                    lam=c.gae_lambda)
    return {**batch, 'old_logps': logps_bt, 'old_values': values_bt * mask_bt, 'kl': kl_bt,
            'advantages': whiten(advantages_bt, mask_bt) * mask_bt, 'returns': returns_bt}

  def loss(self, model, batch, dropout_key, frozen=None):
    del frozen
    c = self.config
    logits_btv, values_bt = model(batch['sequences'][:, :-1], dropout_key=dropout_key,
                                  with_values=True)
    mask_bt = batch['mask'][:, 1:].astype(jnp.float32)
    loss, policy_loss, value_loss, clipped_bt = ppo_loss(
        logps_bt=picked_logps(logits_btv, batch['sequences']), old_logps_bt=batch['old_logps'],
        advantages_bt=batch['advantages'], values_bt=values_bt, old_values_bt=batch['old_values'],
        returns_bt=batch['returns'], mask_bt=mask_bt, epsilon=c.clip_epsilon,
        value_clip=c.value_clip, value_coef=c.value_coef)
    tokens = jnp.maximum(jnp.sum(mask_bt), 1)
    return loss, {'loss': loss, 'policy_loss': policy_loss, 'value_loss': value_loss,
                  'reward': jnp.mean(batch['scores']), 'reward_std': jnp.std(batch['scores']),
                  'kl': jnp.mean(jnp.sum(batch['kl'], axis=1)),
                  'clip_fraction': jnp.sum(clipped_bt * mask_bt) / tokens,
                  'entropy': _entropy(jax.lax.stop_gradient(logits_btv), mask_bt),
                  'completion_tokens': tokens / mask_bt.shape[0]}
