"""The optimizer against its definitions: the schedule's formula and where decay applies."""
import math

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from conftest import small_config
from lmlab.models.decoder import DecoderLM
from lmlab.training.optimizer import OptimizerConfig, make_optimizer, schedule


def test_schedule_is_linear_warmup_then_cosine(rng):
  config = OptimizerConfig(learning_rate=float(rng.uniform(1e-4, 1e-2)),
                           warmup_steps=int(rng.integers(1, 20)),
                           total_steps=int(rng.integers(50, 200)), final_lr_fraction=0.1)
  lr = schedule(config)
  peak, floor = config.learning_rate, config.learning_rate * 0.1
  for step in range(config.total_steps + 5):
    if step < config.warmup_steps:
      expected = peak * step / config.warmup_steps
    else:
      progress = min(1.0, (step - config.warmup_steps) /
                     (config.total_steps - config.warmup_steps))
      expected = floor + (peak - floor) * 0.5 * (1 + math.cos(math.pi * progress))
    assert math.isclose(float(lr(step)), expected, rel_tol=1e-5, abs_tol=1e-9), step


def test_weight_decay_spares_norms_and_biases(rng):
  config = small_config(norm='layernorm', qkv_bias=True, use_bias=True)
  _, params = nnx.split(DecoderLM(config, rngs=nnx.Rngs(int(rng.integers(1 << 30)))))
  params = jax.tree.map(lambda p: p + 1.0, params)  # Biases would be zero otherwise.
  opt = OptimizerConfig(learning_rate=0.5, warmup_steps=0, total_steps=10, weight_decay=0.1)
  optimizer = make_optimizer(opt)
  zero_grads = jax.tree.map(jnp.zeros_like, params)
  updates, _ = jax.jit(optimizer.update)(zero_grads, optimizer.init(params), params)
  flat_params = dict(nnx.to_flat_state(params))
  for path, update in nnx.to_flat_state(updates):
    name, value = '/'.join(map(str, path)), np.asarray(flat_params[path][...])
    if value.ndim >= 2:  # Matrices: p <- p - lr * wd * p (Adam's part is 0 for zero grads).
      np.testing.assert_allclose(np.asarray(update[...]), -0.5 * 0.1 * value, rtol=1e-5,
                                 err_msg=name)
    else:
      assert 'scale' in name or 'bias' in name
      assert np.all(np.asarray(update[...]) == 0.0), name
