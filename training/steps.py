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


def make_train_step(graphdef, optimizer, lr_schedule, *, seed: int, use_dropout: bool):
  """step(params, opt_state, inputs_abt, targets_abt, step) -> (params, opt_state, metrics).

  The batch arrives as A micro-batches [A, B, T]; their gradients are averaged before
  one optimizer update (gradient accumulation). Dropout keys derive from (seed, step).
  """
  base_key = jax.random.key(seed)

  def loss_fn(params, inputs_bt, targets_bt, dropout_key):
    model = nnx.merge(graphdef, params)
    return cross_entropy(model(inputs_bt, dropout_key=dropout_key), targets_bt)

  @functools.partial(jax.jit, donate_argnums=(0, 1))
  def train_step(params, opt_state, inputs_abt, targets_abt, step):
    step_key = jax.random.fold_in(base_key, step)

    def accumulate(grad_sum, micro):
      index, inputs_bt, targets_bt = micro
      key = jax.random.fold_in(step_key, index) if use_dropout else None
      loss, grads = jax.value_and_grad(loss_fn)(params, inputs_bt, targets_bt, key)
      return jax.tree.map(jnp.add, grad_sum, grads), loss

    n_micro = inputs_abt.shape[0]
    zeros = jax.tree.map(jnp.zeros_like, params)
    grad_sum, losses = jax.lax.scan(accumulate, zeros,
                                    (jnp.arange(n_micro), inputs_abt, targets_abt))
    grads = jax.tree.map(lambda g: g / n_micro, grad_sum)
    updates, opt_state = optimizer.update(grads, opt_state, params)
    params = optax.apply_updates(params, updates)
    metrics = {'loss': losses.mean(), 'grad_norm': optax.tree.norm(grads),
               'lr': lr_schedule(step)}
    return params, opt_state, metrics

  return train_step


def make_eval_step(graphdef):
  """eval_step(params, inputs_bt, targets_bt) -> mean loss of the batch."""

  @jax.jit
  def eval_step(params, inputs_bt, targets_bt):
    return cross_entropy(nnx.merge(graphdef, params)(inputs_bt), targets_bt)

  return eval_step
