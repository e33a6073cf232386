"""The trainer's extension points: an objective that trains part of the model against frozen
state, checked against optax steps taken by hand; and a resume of such a run."""
import dataclasses
import json

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from conftest import small_config
from lmlab.models.registry import build
from lmlab.training.config import TrainConfig
from lmlab.training.language_modeling import LanguageModeling
from lmlab.training.loop import train
from lmlab.training.optimizer import OptimizerConfig, make_optimizer
from lmlab.training.steps import cross_entropy

HEAD = nnx.PathContains('lm_head')
ANCHOR = 0.5


def head_loss(model, batch, head0):
  """Next-token loss plus ANCHOR times the squared distance of the head from head0."""
  logits = model(batch['inputs'], positions_bt=batch.get('positions'))
  distance = sum(jnp.sum(jnp.square(a - b)) for a, b in zip(
      jax.tree.leaves(nnx.state(model, HEAD)), jax.tree.leaves(head0)))
  return cross_entropy(logits, batch['targets']) + ANCHOR * distance


class HeadAnchored(LanguageModeling):
  """Trains only the output head, pulled towards its initial value (held as frozen state)."""
  trainable = HEAD

  def frozen(self, initial_params):
    return nnx.filter_state(initial_params(), HEAD)

  def loss(self, model, batch, dropout_key, frozen):
    loss = head_loss(model, batch, frozen)
    return loss, {'loss': loss}


def test_partly_trained_objective_with_frozen_state(tmp_path, rng):
  corpus = tmp_path / 'corpus.txt'
  corpus.write_text(' '.join(rng.choice(['ab', 'cd', 'ef', 'gh', '\n'], 3000)))
  seed = int(rng.integers(1000))
  run = TrainConfig(workdir=str(tmp_path / 'run'), data=str(corpus), steps=3, batch_size=4,
                    seq_len=16, seed=seed, document_masking=False, eval_every=100,
                    eval_batches=1, save_every=100, log_every=1)
  model_config = small_config(vocab_size=0, tie_embeddings=False)
  # Adam's default eps makes an entry's update its gradient's sign where the gradient is near
  # zero, so two float32 computations of one tiny gradient could move it by the full step in
  # opposite directions; a large eps keeps the update proportional to the gradient there.
  opt_config = OptimizerConfig(learning_rate=1e-2, warmup_steps=1, eps=1e-2)
  params, _, _, _ = train(run, model_config, opt_config, objective=HeadAnchored,
                          print_fn=lambda *a: None)

  # The oracle: the same batches, and adamw on the head alone, step by step.
  task = HeadAnchored(run.resolved(model_config), model_config, log=lambda *a: None)
  task.load_data()
  graphdef = nnx.graphdef(build(task.model_config, rngs=nnx.Rngs(0)))
  # Initialised under jit as the loop does (eagerly, the last bits of some draws differ).
  initial = jax.jit(lambda: nnx.state(build(task.model_config, rngs=nnx.Rngs(params=seed))))()
  head0 = nnx.filter_state(initial, HEAD)
  rest = nnx.filter_state(initial, nnx.Not(HEAD))
  optimizer = make_optimizer(opt_config.resolved(run.steps, 'decoder'))

  @jax.jit  # Eagerly, op by op, a step takes seconds.
  def oracle_step(head, opt_state, batch):
    loss, grads = jax.value_and_grad(lambda head: head_loss(
        nnx.merge(graphdef, nnx.merge_state(head, rest)), batch, head0))(head)
    updates, opt_state = optimizer.update(grads, opt_state, head)
    return optax.apply_updates(head, updates), opt_state, loss

  head, opt_state, losses = head0, optimizer.init(head0), []
  for step in range(run.steps):
    head, opt_state, loss = oracle_step(head, opt_state, task.train_batch(step))
    losses.append(float(loss))

  for (path, got), (_, want) in zip(nnx.to_flat_state(nnx.filter_state(params, HEAD)),
                                    nnx.to_flat_state(head)):
    np.testing.assert_allclose(np.asarray(got[...]), np.asarray(want[...]), rtol=2e-5,
                               atol=1e-7, err_msg=str(path))
  for (path, got), (_, want) in zip(nnx.to_flat_state(nnx.filter_state(params, nnx.Not(HEAD))),
                                    nnx.to_flat_state(rest)):
    np.testing.assert_array_equal(np.asarray(got[...]), np.asarray(want[...]), str(path))
  with open(tmp_path / 'run' / 'metrics.jsonl') as f:
    logged = [json.loads(line)['loss'] for line in f if '"loss"' in line]
  np.testing.assert_allclose(logged, losses, rtol=1e-5)

  # Stopped after 2 steps and resumed, the run ends where the uninterrupted one did: the
  # optimizer state of the head alone is saved and restored.
  resumed = dataclasses.replace(run, workdir=str(tmp_path / 'resumed'))
  train(dataclasses.replace(resumed, steps=2), model_config, opt_config.resolved(3, 'decoder'),
        objective=HeadAnchored, print_fn=lambda *a: None)
  again, _, _, _ = train(resumed, model_config, opt_config, objective=HeadAnchored,
                         print_fn=lambda *a: None)
  for got, want in zip(jax.tree.leaves(again), jax.tree.leaves(params)):
    np.testing.assert_array_equal(np.asarray(got), np.asarray(want))
