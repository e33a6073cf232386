"""Orbax round trip of parameters and optimizer state, bit for bit."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from conftest import small_config
from lmlab.models.decoder import DecoderLM
from lmlab.training.checkpoint import CheckpointError, Checkpoints
from lmlab.training.optimizer import OptimizerConfig, make_optimizer


def test_round_trip_is_exact(tmp_path, rng):
  config = small_config(norm='layernorm', qkv_bias=True)
  _, params = nnx.split(DecoderLM(config, rngs=nnx.Rngs(int(rng.integers(1 << 30)))))
  optimizer = make_optimizer(OptimizerConfig().resolved(steps=10, family='decoder'))
  opt_state = optimizer.init(params)
  grads = jax.tree.map(lambda p: jnp.asarray(rng.standard_normal(p.shape), p.dtype), params)
  _, opt_state = jax.jit(optimizer.update)(grads, opt_state, params)  # Non-trivial moments.
  state = {'params': params, 'opt_state': opt_state}
  record = {'step': 7, 'seed': 3}

  checkpoints = Checkpoints(str(tmp_path), keep=2)
  checkpoints.save(7, state, record)
  checkpoints.close()
  reopened = Checkpoints(str(tmp_path))
  assert reopened.latest_step() == 7
  assert reopened.read_record(7)['seed'] == 3
  restored = reopened.restore_state(7, jax.eval_shape(lambda: state))
  for a, b in zip(jax.tree.leaves(state), jax.tree.leaves(restored)):
    assert a.dtype == b.dtype
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))

  other = DecoderLM(small_config(d_model=48), rngs=nnx.Rngs(0))
  with pytest.raises(CheckpointError):
    reopened.restore_state(7, jax.eval_shape(lambda: {'params': nnx.state(other),
                                                      'opt_state': opt_state}))
