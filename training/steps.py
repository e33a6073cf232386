"""The jitted train and eval steps: pure functions of (params, optimizer state, batch).

The model is split into a graph definition and a parameter state once; each step merges
them inside jit, so nothing walks the NNX object graph in Python per step and the step
is traced once.
"""
import functools

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from lmlab.models.moe import with_router_losses


def cross_entropy(logits_btv, targets_bt):
  """Mean next-token cross-entropy, computed in float32."""
  return optax.softmax_cross_entropy_with_integer_labels(
      logits_btv.astype(jnp.float32), targets_bt).mean()


def objective(logits_btv, targets_bt, *, z_loss: float = 0.0, max_z_loss: float = 0.0):
  """(loss to minimise, metrics): cross-entropy plus optional logit penalties.

  z_loss weighs PaLM's mean log^2 Z (Chowdhery et al. 2022 use 1e-4); max_z_loss weighs
  Baichuan 2's mean squared largest logit (Yang et al. 2023 use 2e-4). Both keep logits from
  drifting, which matters most in low precision. The metric 'loss' is the cross-entropy alone.
  """
  logits_btv = logits_btv.astype(jnp.float32)
  log_z_bt = jax.nn.logsumexp(logits_btv, axis=-1)
  target_logit_bt = jnp.take_along_axis(logits_btv, targets_bt[..., None], axis=-1)[..., 0]
  metrics = {'loss': jnp.mean(log_z_bt - target_logit_bt)}
  total = metrics['loss']
  if z_loss:
    metrics['z_loss'] = jnp.mean(jnp.square(log_z_bt))
    total = total + z_loss * metrics['z_loss']
  if max_z_loss:
    metrics['max_z_loss'] = jnp.mean(jnp.square(jnp.max(logits_btv, axis=-1)))
    total = total + max_z_loss * metrics['max_z_loss']
  return total, metrics


def batch_logits(graphdef, params, batch, dropout_key=None):
  """Logits of a batch dict: 'inputs' [B, T], and for packed documents 'positions' and
  'segment_ids' [B, T]; for a prefix-LM, 'prefix_len' [B]."""
  return model_logits(nnx.merge(graphdef, params), batch, dropout_key)


def model_logits(model, batch, dropout_key=None):
  """batch_logits of a model."""
  return model(batch['inputs'], positions_bt=batch.get('positions'),
               segment_ids_bt=batch.get('segment_ids'), prefix_len_b=batch.get('prefix_len'),
               dropout_key=dropout_key)


def batch_loss(graphdef, params, batch):
  """Mean next-token cross-entropy of a batch dict (see batch_logits) against 'targets'."""
  return cross_entropy(batch_logits(graphdef, params, batch), batch['targets'])


def make_train_step(graphdef, optimizer, lr_schedule, *, seed: int, use_dropout: bool,
                    z_loss: float = 0.0, max_z_loss: float = 0.0, loss_fn=None,
                    trainable=None, shardings=None, prepare=None, updates: int = 1,
                    minibatches: int = 1):
  """step(params, opt_state, batch, step, frozen=None) -> (params, opt_state, metrics).

  Every array of the batch dict arrives as A micro-batches [A, B, T]; their gradients are
  averaged before one optimizer update (gradient accumulation). Dropout keys derive from
  (seed, step). z_loss and max_z_loss weigh the logit penalties of `objective`.
  The router losses of a mixture of experts (models/moe.py) are added to the loss, and their
  metrics to its metrics.
  loss_fn(model, micro_batch, dropout_key, frozen) -> (loss, metrics), when given, replaces
  the next-token objective (BERT's, sequence-to-sequence, classification); frozen is state it
  reads without training it (None when there is none).
  trainable, an nnx filter, selects the parameters the optimizer updates (its state covers
  only them; see trainable_part); None: all of them.
  shardings, when given, is (params', optimizer state's, batch's, replicated, frozen's)
  shardings, which the step takes its inputs in and returns its outputs in.
  prepare(model, micro_batch, frozen) -> micro_batch, when given, adds to each micro-batch
  what the loss needs from the parameters the step starts with (PPO's old log-probabilities,
  values and advantages); then `updates` updates are taken, each from the gradients of one of
  `minibatches` equal groups of the micro-batches, the groups in turn (metrics: their mean
  over the updates). With one group every update sees the whole batch (PPO's epochs).
  """
  base_key = jax.random.key(seed)

  def next_token_loss(model, micro_batch, key, frozen):
    del frozen
    return objective(model_logits(model, micro_batch, key), micro_batch['targets'],
                     z_loss=z_loss, max_z_loss=max_z_loss)

  # A mixture of experts' router losses join whichever loss the step minimises.
  loss_of_model = with_router_losses(loss_fn or next_token_loss)

  def micro_objective(params, micro_batch, key, frozen):
    return loss_of_model(nnx.merge(graphdef, params), micro_batch, key, frozen)

  def update(params, opt_state, batch, number, frozen, update_key):
    """The `number`th optimizer update (counting from 0)."""
    trained, fixed = ((params, None) if trainable is None else
                      nnx.split_state(params, trainable, ...))
    whole = (lambda trained: trained) if fixed is None else (
        lambda trained: nnx.merge_state(trained, fixed))

    def accumulate(grad_sum, micro):
      index, micro_batch = micro
      key = jax.random.fold_in(update_key, index) if use_dropout else None
      (_, metrics), grads = jax.value_and_grad(
          lambda trained: micro_objective(whole(trained), micro_batch, key, frozen),
          has_aux=True)(trained)
      return jax.tree.map(jnp.add, grad_sum, grads), metrics

    n_micro = jax.tree.leaves(batch)[0].shape[0]
    zeros = jax.tree.map(jnp.zeros_like, trained)
    grad_sum, micro_metrics = jax.lax.scan(accumulate, zeros, (jnp.arange(n_micro), batch))
    grads = jax.tree.map(lambda g: g / n_micro, grad_sum)
    updates, opt_state = optimizer.update(grads, opt_state, trained)
    params = whole(optax.apply_updates(trained, updates))
    metrics = {**jax.tree.map(jnp.mean, micro_metrics), 'grad_norm': optax.tree.norm(grads),
               'lr': lr_schedule(number)}
    return params, opt_state, metrics

  def train_step(params, opt_state, batch, step, frozen=None):
    step_key = jax.random.fold_in(base_key, step)
    if prepare is not None:
      model = nnx.merge(graphdef, params)
      batch = jax.lax.map(lambda micro: prepare(model, micro, frozen), batch)
    if updates == 1:
      return update(params, opt_state, batch, step, frozen, step_key)
    groups = jax.tree.map(lambda x: x.reshape(minibatches, -1, *x.shape[1:]), batch)

    def one_update(carry, index):
      params, opt_state = carry
      group = batch if minibatches == 1 else jax.tree.map(lambda x: x[index % minibatches],
                                                          groups)
      params, opt_state, metrics = update(params, opt_state, group, step * updates + index,
                                          frozen, jax.random.fold_in(step_key, index))
      return (params, opt_state), metrics

    (params, opt_state), metrics = jax.lax.scan(one_update, (params, opt_state),
                                                jnp.arange(updates))
    return params, opt_state, jax.tree.map(jnp.mean, metrics)

  if shardings is None:
    return jax.jit(train_step, donate_argnums=(0, 1))
  params_at, opt_state_at, batch_at, replicated, frozen_at = shardings
  return jax.jit(train_step, donate_argnums=(0, 1),
                 in_shardings=(params_at, opt_state_at, batch_at, replicated, frozen_at),
                 out_shardings=(params_at, opt_state_at, replicated))


def trainable_part(params, trainable):
  """The parameters a step with this `trainable` filter updates (what its optimizer state
  is made for)."""
  return params if trainable is None else nnx.filter_state(params, trainable)


def make_eval_step(graphdef):
  """eval_step(params, batch) -> mean loss of the batch."""
  return jax.jit(functools.partial(batch_loss, graphdef))
