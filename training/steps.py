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


def cross_entropy(logits_btv, targets_bt):
  """Mean next-token cross-entropy, computed in float32."""
  return optax.softmax_cross_entropy_with_integer_labels(
      logits_btv.astype(jnp.float32), targets_bt).mean()


def batch_loss(graphdef, params, batch, dropout_key=None):
  """Mean next-token loss of a batch dict: 'inputs' and 'targets' [B, T], and for packed
  documents 'positions' and 'segment_ids' [B, T]."""
  model = nnx.merge(graphdef, params)
  logits = model(batch['inputs'], positions_bt=batch.get('positions'),
                 segment_ids_bt=batch.get('segment_ids'), dropout_key=dropout_key)
  return cross_entropy(logits, batch['targets'])


def make_train_step(graphdef, optimizer, lr_schedule, *, seed: int, use_dropout: bool):
  """step(params, opt_state, batch, step) -> (params, opt_state, metrics).

  Every array of the batch dict arrives as A micro-batches [A, B, T]; their gradients are
  averaged before one optimizer update (gradient accumulation). Dropout keys derive from
  (seed, step).
  """
  base_key = jax.random.key(seed)

  @functools.partial(jax.jit, donate_argnums=(0, 1))
  def train_step(params, opt_state, batch, step):
    step_key = jax.random.fold_in(base_key, step)

    def accumulate(grad_sum, micro):
      index, micro_batch = micro
      key = jax.random.fold_in(step_key, index) if use_dropout else None
      loss, grads = jax.value_and_grad(
          lambda p: batch_loss(graphdef, p, micro_batch, key))(params)
      return jax.tree.map(jnp.add, grad_sum, grads), loss

    n_micro = batch['inputs'].shape[0]
    zeros = jax.tree.map(jnp.zeros_like, params)
    grad_sum, losses = jax.lax.scan(accumulate, zeros, (jnp.arange(n_micro), batch))
    grads = jax.tree.map(lambda g: g / n_micro, grad_sum)
    updates, opt_state = optimizer.update(grads, opt_state, params)
    params = optax.apply_updates(params, updates)
    metrics = {'loss': losses.mean(), 'grad_norm': optax.tree.norm(grads),
               'lr': lr_schedule(step)}
    return params, opt_state, metrics

  return train_step


def make_eval_step(graphdef):
  """eval_step(params, batch) -> mean loss of the batch."""
  return jax.jit(functools.partial(batch_loss, graphdef))
