"""Learning from preference pairs: a reward model (objective 'reward') and direct preference
optimisation (objective 'dpo'), on the pairs of data/preferences.py.

  python main.py --objective=sft --data=synthetic:arithmetic --workdir=runs/sft ...
  python main.py --objective=reward --data=synthetic:arithmetic --init_from=runs/sft \
      --workdir=runs/reward
  python main.py --objective=dpo --data=synthetic:arithmetic --init_from=runs/sft \
      --workdir=runs/dpo [--dpo_loss=sigmoid|robust|hinge|ipo|simpo --beta=0.1]

A reward model is the decoder with a score head (n_labels=1) in place of its LM head, read at
the last token of each side; it trains on -log σ(r_chosen - r_rejected - margin) and reports
its pairwise accuracy and mean margin. DPO trains the policy (all of it, or a --peft
method's parameters) on the losses of training/preference_losses.py. Its reference is the
run's initial parameters (the --init_from run: the SFT model), kept frozen beside the policy;
the reference's log-probabilities are computed inside each jitted step, one more forward pass
on the batch, rather than precomputed once over the data: that costs about a third of a step
but no pass before training, no stored table, and stays right for any batch a (seed, step)
draws. Metrics carry TRL's names: rewards/chosen, rewards/rejected, rewards/margins,
rewards/accuracies, logps/chosen, logps/rejected (and nll_loss with --rpo_alpha, which adds
the chosen replies' negative log-likelihood to the loss: RPO).

Pairs longer than --seq_len tokens (either side) are left out; the last --val_fraction of the
pairs are held out.
"""
import dataclasses

import jax
import jax.numpy as jnp
from flax import nnx

from lmlab.data import preferences
from lmlab.data.chat_template import chat_template
from lmlab.data.errors import DataError
from lmlab.models.config import ModelConfig
from lmlab.models.errors import ConfigError
from lmlab.training.config import TrainConfig
from lmlab.training.language_modeling import load_run_tokenizer
from lmlab.training.objective import Objective
from lmlab.training.preference_losses import chosen_nll, dpo_loss, reward_loss
from lmlab.training.sft import chat_model_config, held_out_count


def _both_sides(batch, name: str):
  """The chosen then the rejected rows of batch's `name` arrays, as one [2B, ...] array."""
  return jnp.concatenate([batch[f'chosen_{name}'], batch[f'rejected_{name}']])


def _weighted_means(batch, values: dict) -> dict:
  """Each [B] value's mean over the batch's real pairs, and their number as 'pairs'."""
  weight_b = batch['weight']
  pairs = jnp.sum(weight_b)
  means = {name: jnp.sum(value_b.astype(jnp.float32) * weight_b) / jnp.maximum(pairs, 1.0)
           for name, value_b in values.items()}
  return {**means, 'pairs': pairs}


def last_token_scores(model, tokens_bt, length_b, dropout_key=None):
  """A reward model's score [B] of each right-padded row, read at its last real token."""
  scores_bt = model(tokens_bt, dropout_key=dropout_key)[..., 0].astype(jnp.float32)
  return jnp.take_along_axis(scores_bt, (length_b - 1)[:, None], axis=1)[:, 0]


def picked_logps(logits_btv, tokens_bt):
  """log p of tokens_bt[:, 1:] under the logits of the tokens before them [B, T-1, V]."""
  logits_btv = logits_btv.astype(jnp.float32)
  return (jnp.take_along_axis(logits_btv, tokens_bt[:, 1:, None], axis=-1)[..., 0]
          - jax.nn.logsumexp(logits_btv, axis=-1))


def token_logps(model, tokens_bt, dropout_key=None):
  """(log p of each token from the ones before it [B, T-1], the logits [B, T-1, V])."""
  logits_btv = model(tokens_bt[:, :-1], dropout_key=dropout_key)
  return picked_logps(logits_btv, tokens_bt), logits_btv


def sequence_logps(model, tokens_bt, mask_bt, dropout_key=None):
  """The sum over each row of log p(token) at the positions where mask_bt is 1 (the first
  token, which nothing predicts, is never masked in)."""
  return jnp.sum(token_logps(model, tokens_bt, dropout_key)[0] * mask_bt[:, 1:], axis=1)


class _Preferences(Objective):
  """Pairs read, encoded and split; batches; evaluation over every held-out pair."""
  name = ''
  reference = None  # The parameters a loss compares against (DPO's reference), if any.

  def __init__(self, train_config: TrainConfig, model_config: ModelConfig, *, log=print):
    if model_config.family != 'decoder':
      raise ConfigError(f'--objective={self.name} trains a decoder, not '
                        f'family={model_config.family}')
    if not train_config.data:
      raise DataError(f'--objective={self.name} needs --data=<file.jsonl> of preference pairs '
                      '(or synthetic:arithmetic)')
    self.config, self.log = train_config, log
    self.template = chat_template(train_config.chat_template)
    self.tokenizer = load_run_tokenizer(train_config)
    self.model_config = chat_model_config(model_config, self.tokenizer, train_config.seq_len,
                                          self.head_config)
    self._eval_steps = {}
    self._read_pairs()

  def head_config(self, model_config: ModelConfig) -> ModelConfig:
    return model_config

  def load_data(self):
    """The pairs are read in __init__: bad data stops the run before it writes."""

  def _read_pairs(self):
    raw = preferences.read_pairs(self.config.data)
    n_val = held_out_count(len(raw), 'pairs', self.config)
    encoded = preferences.encode_pairs(raw, self.template, self.tokenizer)
    seq_len = self.config.seq_len
    self.train = [pair for pair in encoded[:-n_val] if preferences.fits(pair, seq_len)]
    self.val = [pair for pair in encoded[-n_val:] if preferences.fits(pair, seq_len)]
    left_out = len(encoded) - len(self.train) - len(self.val)
    if not (self.train and self.val):
      raise DataError(f'no {"training" if not self.train else "held-out"} pair of '
                      f'{self.config.data} fits --seq_len={seq_len} tokens; raise it')
    self.log(f'{len(self.train)} training pairs, {len(self.val)} held out'
             + (f'; {left_out} longer than --seq_len={seq_len} are left out' if left_out else ''))

  def train_batch(self, step: int):
    return preferences.train_batch(self.train, seed=self.config.seed, step=step,
                                   batch_size=self.config.batch_size, seq_len=self.config.seq_len)

  def evaluate(self, graphdef, params):
    """The loss and metrics over every held-out pair (whatever --eval_batches says)."""
    if graphdef not in self._eval_steps:
      self._eval_steps[graphdef] = jax.jit(
          lambda params, batch, frozen: self.loss(nnx.merge(graphdef, params), batch, None,
                                                  frozen)[1])
    put_batch = self.put_batch or (lambda batch: jax.tree.map(jnp.asarray, batch))
    totals, count = {}, 0.0
    for batch in preferences.eval_batches(self.val, batch_size=self.config.micro_batch_size,
                                          seq_len=self.config.seq_len):
      metrics = jax.device_get(self._eval_steps[graphdef](params, put_batch(batch),
                                                           self.reference))
      pairs = float(metrics.pop('pairs'))
      for name, value in metrics.items():
        totals[name] = totals.get(name, 0.0) + float(value) * pairs
      count += pairs
    return {f'eval_{name}': total / count for name, total in totals.items()}


class RewardModelling(_Preferences):
  """A reward model: the score head's output at each side's last token."""
  name = 'reward'

  def head_config(self, model_config):
    return dataclasses.replace(model_config, n_labels=1)

  def loss(self, model, batch, dropout_key, frozen=None):
    del frozen
    score_b = last_token_scores(model, _both_sides(batch, 'tokens'),
                                _both_sides(batch, 'length'), dropout_key)
    chosen_b, rejected_b = jnp.split(score_b, 2)
    loss_b = reward_loss(chosen_b, rejected_b, batch['margin'])
    metrics = _weighted_means(batch, {'loss': loss_b, 'accuracy': chosen_b > rejected_b,
                                      'margin': chosen_b - rejected_b})
    return metrics['loss'], metrics


class DirectPreference(_Preferences):
  """DPO and its variants against the frozen initial parameters."""
  name = 'dpo'

  def frozen(self, params):
    """The reference: the run's initial parameters (none for the reference-free SimPO)."""
    self.reference = None if self.config.dpo_loss == 'simpo' else params()
    return self.reference

  def loss(self, model, batch, dropout_key, frozen=None):
    tokens_bt, mask_bt = _both_sides(batch, 'tokens'), _both_sides(batch, 'mask')
    logps_b = sequence_logps(model, tokens_bt, mask_bt, dropout_key)
    # At least 1: an evaluation batch's padding rows have no reply.
    chosen_length_b, rejected_length_b = jnp.split(jnp.maximum(jnp.sum(mask_bt, axis=1), 1), 2)
    chosen_logps_b, rejected_logps_b = jnp.split(logps_b, 2)
    ref_chosen_b = ref_rejected_b = None
    if self.config.dpo_loss != 'simpo':
      if frozen is None:
        raise ConfigError(f'--dpo_loss={self.config.dpo_loss} compares against the reference '
                          'model, which only the training run holds; its eval metrics are in '
                          'its metrics.jsonl')
      reference = nnx.merge(nnx.graphdef(model), frozen)
      ref_logps_b = jax.lax.stop_gradient(sequence_logps(reference, tokens_bt, mask_bt))
      ref_chosen_b, ref_rejected_b = jnp.split(ref_logps_b, 2)
    c = self.config
    loss_b, chosen_reward_b, rejected_reward_b = dpo_loss(
        c.dpo_loss, beta=c.beta, chosen_logps_b=chosen_logps_b,
        rejected_logps_b=rejected_logps_b, ref_chosen_logps_b=ref_chosen_b,
        ref_rejected_logps_b=ref_rejected_b, chosen_length_b=chosen_length_b,
        rejected_length_b=rejected_length_b, label_smoothing=c.label_smoothing or 0.0,
        gamma=c.simpo_gamma)
    metrics = _weighted_means(batch, {
        'loss': loss_b, 'rewards/chosen': chosen_reward_b, 'rewards/rejected': rejected_reward_b,
        'rewards/margins': chosen_reward_b - rejected_reward_b,
        'rewards/accuracies': chosen_reward_b > rejected_reward_b,
        'logps/chosen': chosen_logps_b, 'logps/rejected': rejected_logps_b})
    if c.rpo_alpha:
      metrics['nll_loss'] = chosen_nll(chosen_logps_b, chosen_length_b, batch['weight'])
      metrics['loss'] += c.rpo_alpha * metrics['nll_loss']
    return metrics['loss'], metrics
