"""Mask and head options of the decoder: sliding window, prefix-LM, padding masks, NormHead,
and the z-loss / max-z penalties, each against its definition."""
import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from conftest import jit_call, small_config
from test_model import ShiftedEmbedding, build, random_tokens
from lmlab.training import steps as steps_lib


def depends_on(model, tokens, t, **kwargs):
  """bool [T]: whether the logits at position t change with the input at each position."""
  graphdef, params = nnx.split(model)

  def output_at_t(offset_btd):
    shifted = nnx.merge(graphdef, params)
    shifted.embed = ShiftedEmbedding(shifted.embed, offset_btd)
    return shifted(tokens, **kwargs)[0, t].sum()

  grad_btd = jax.jit(jax.grad(output_at_t))(jnp.zeros((*tokens.shape, model.config.d_model)))
  return np.any(np.asarray(grad_btd[0]) != 0.0, axis=-1)


def test_sliding_window_sees_exactly_the_last_w_tokens(rng):
  window = int(rng.integers(2, 5))
  config = small_config(n_layers=1, sliding_window=window)
  model = build(config, rng)
  tokens = random_tokens(rng, config, (1, 12))
  t = int(rng.integers(window, 12))
  expected = (np.arange(12) <= t) & (np.arange(12) > t - window)
  np.testing.assert_array_equal(depends_on(model, tokens, t), expected)


def test_prefix_lm_is_bidirectional_in_the_prefix_and_causal_after(rng):
  config = small_config(n_layers=1)
  model = build(config, rng)
  tokens = random_tokens(rng, config, (1, 10))
  prefix = int(rng.integers(2, 8))
  for t in (int(rng.integers(0, prefix)), int(rng.integers(prefix, 10))):
    expected = np.arange(10) < prefix if t < prefix else np.arange(10) <= t
    np.testing.assert_array_equal(
        depends_on(model, tokens, t, prefix_len_b=jnp.array([prefix])), expected)


def test_left_and_right_padding_give_the_unpadded_logits(rng):
  config = small_config()
  model = build(config, rng)
  forward = jit_call(model)
  lengths = rng.integers(3, 9, 2)
  width = int(lengths.max()) + 2
  rows = [random_tokens(rng, config, (int(n),)) for n in lengths]
  for left in (True, False):
    padded, mask = [], []
    for row in rows:
      pad = jnp.zeros(width - row.shape[0], jnp.int32)
      padded.append(jnp.concatenate([pad, row] if left else [row, pad]))
      ones, zeros = jnp.ones(row.shape[0], jnp.int32), jnp.zeros_like(pad)
      mask.append(jnp.concatenate([zeros, ones] if left else [ones, zeros]))
    logits = forward(jnp.stack(padded), attention_mask=jnp.stack(mask))
    for b, row in enumerate(rows):
      real = np.asarray(mask[b]) == 1
      np.testing.assert_allclose(np.asarray(logits[b][real]), np.asarray(forward(row[None])[0]),
                                 rtol=1e-5, atol=1e-5)


def test_normhead_uses_unit_length_output_embeddings(rng):
  """NormHead logits equal a plain head whose vocabulary vectors were normalised."""
  model = build(small_config(head='normhead'), rng)
  graphdef, params = nnx.split(model)
  tokens = random_tokens(rng, model.config, (2, 6))
  plain = nnx.merge(graphdef, params)
  kernel_dv = np.asarray(plain.lm_head.kernel[...])
  plain.lm_head.kernel[...] = jnp.asarray(kernel_dv / np.linalg.norm(kernel_dv, axis=0))
  plain.config = small_config()
  np.testing.assert_allclose(np.asarray(jit_call(model)(tokens)),
                             np.asarray(jit_call(plain)(tokens)), rtol=1e-5, atol=1e-5)


def test_z_loss_and_max_z_loss_follow_their_formulas(rng):
  logits = rng.normal(size=(2, 5, 11)).astype(np.float32) * 3
  targets = rng.integers(0, 11, (2, 5))
  z_weight, max_z_weight = float(rng.uniform(1e-4, 1e-2)), float(rng.uniform(1e-4, 1e-2))
  total, metrics = steps_lib.objective(jnp.asarray(logits), jnp.asarray(targets),
                                       z_loss=z_weight, max_z_loss=max_z_weight)
  log_z = np.log(np.exp(logits.astype(np.float64)).sum(-1))
  cross_entropy = np.mean(log_z - np.take_along_axis(logits, targets[..., None], -1)[..., 0])
  z_term, max_z_term = np.mean(log_z ** 2), np.mean(logits.max(-1) ** 2)
  np.testing.assert_allclose(float(metrics['loss']), cross_entropy, rtol=1e-5)
  np.testing.assert_allclose(float(metrics['z_loss']), z_term, rtol=1e-5)
  np.testing.assert_allclose(float(metrics['max_z_loss']), max_z_term, rtol=1e-5)
  np.testing.assert_allclose(float(total),
                             cross_entropy + z_weight * z_term + max_z_weight * max_z_term,
                             rtol=1e-5)
