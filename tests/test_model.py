"""The decoder: shapes, causality, KV cache, remat, presets, and each component's formula."""
import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from conftest import jit_call, small_config
from lmlab.models import config as config_lib
from lmlab.models.block import deepnorm_constants
from lmlab.models.decoder import DecoderLM
from lmlab.models.registry import param_count
from lmlab.models.mlp import ACTIVATIONS
from lmlab.models.normalization import LayerNorm, RMSNorm
from lmlab.models.positions import (alibi_slopes, apply_rope, make_position_encoding,
                                    rope_cos_sin, sinusoidal_table)
from lmlab.training import steps as steps_lib
from lmlab.training.optimizer import OptimizerConfig, make_optimizer, schedule


def random_tokens(rng, config, shape):
  return jnp.asarray(rng.integers(0, config.vocab_size, shape), jnp.int32)


def build(config, rng):
  return DecoderLM(config, rngs=nnx.Rngs(int(rng.integers(1 << 30))))


def decode_in_steps(model, tokens, prefill, cache_length):
  """Logits of a prefill of `prefill` tokens, then of one token at a time (jitted)."""
  graphdef, state = nnx.split(model)
  decode = jax.jit(lambda st, tokens_bt, caches, i: nnx.merge(graphdef, st).decode(
      tokens_bt, caches, i))
  caches = model.init_cache(tokens.shape[0], cache_length)
  logits, caches = decode(state, tokens[:, :prefill], caches, 0)
  steps = [logits]
  for i in range(prefill, tokens.shape[1]):
    logits, caches = decode(state, tokens[:, i:i + 1], caches, i)
    steps.append(logits)
  return jnp.concatenate(steps, axis=1), caches


def test_logits_shape_and_dtype(rng):
  config = small_config(dtype='bfloat16')
  tokens = random_tokens(rng, config, (3, 7))
  logits = jit_call(build(config, rng))(tokens)
  assert logits.shape == (3, 7, config.vocab_size)
  assert logits.dtype == jnp.bfloat16


class ShiftedEmbedding(nnx.Module):
  """The model's embedding plus a differentiable offset per (batch, position)."""

  def __init__(self, embed, offset_btd):
    self.embedding = embed.embedding  # The table, as a tied output head reads it.
    self.offset = nnx.Variable(offset_btd)

  def __call__(self, tokens_bt):
    return self.embedding[...][tokens_bt] + self.offset[...]


@pytest.mark.parametrize('fields', [
    dict(), dict(norm_placement='post', position='learned'),
    dict(parallel_block=True, position='sinusoidal', tie_embeddings=True),
    dict(norm_placement='deepnorm', position='none', qk_norm=True)])
def test_causal_gradient_is_exactly_zero(fields, rng):
  config = small_config(**fields)
  graphdef, params = nnx.split(build(config, rng))
  tokens = random_tokens(rng, config, (1, 9))
  t = int(rng.integers(0, 8))

  def output_at_t(offset_btd):
    model = nnx.merge(graphdef, params)
    model.embed = ShiftedEmbedding(model.embed, offset_btd)
    return model(tokens)[0, t].sum()

  grad_btd = jax.jit(jax.grad(output_at_t))(jnp.zeros((1, 9, config.d_model)))
  assert np.all(np.asarray(grad_btd[0, t + 1:]) == 0.0)
  assert np.any(np.asarray(grad_btd[0, :t + 1]) != 0.0)


@pytest.mark.parametrize('fields', [
    dict(), dict(n_kv_heads=1), dict(n_kv_heads=4, position='learned'),
    dict(position='sinusoidal', norm_placement='sandwich'), dict(position='none', qk_norm=True),
    dict(position='alibi', n_kv_heads=1),
    dict(partial_rotary_factor=0.5, rope_interleaved=True,
         rope_scaling='{"rope_type": "yarn", "factor": 2.0, '
         '"original_max_position_embeddings": 8}'),
    dict(parallel_block=True, norm='layernorm', mlp='gelu', use_bias=True, qkv_bias=True)])
def test_cached_decoding_equals_full_forward(fields, rng):
  check_cached_decoding_equals_full_forward(small_config(**fields), rng)


def check_cached_decoding_equals_full_forward(config, rng):
  """Logits of a prompt, then of tokens fed one at a time through the KV cache, equal the
  logits of one uncached forward pass over the whole sequence."""
  model = build(config, rng)
  t = 10
  tokens = random_tokens(rng, config, (2, t))
  full = jit_call(model)(tokens)
  steps, _ = decode_in_steps(model, tokens, int(rng.integers(1, t)), t + 3)
  np.testing.assert_allclose(np.asarray(steps), np.asarray(full), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize('position', ['rope', 'learned'])
def test_packed_documents_do_not_see_each_other(position, rng):
  """Each document of a packed row gets the logits it gets alone (its positions from 0)."""
  config = small_config(position=position)
  model = build(config, rng)
  lengths = rng.integers(1, 8, 3)
  documents = [random_tokens(rng, config, (1, int(n))) for n in lengths]
  packed = jnp.concatenate(documents, axis=1)
  segment_ids = jnp.concatenate([jnp.full((1, int(n)), i) for i, n in enumerate(lengths)], 1)
  positions = jnp.concatenate([jnp.arange(int(n))[None] for n in lengths], 1)
  forward = jit_call(model)
  logits = forward(packed, positions_bt=positions, segment_ids_bt=segment_ids)
  alone = jnp.concatenate([forward(doc) for doc in documents], axis=1)
  np.testing.assert_allclose(np.asarray(logits), np.asarray(alone), rtol=1e-5, atol=1e-5)


def test_remat_gives_equal_gradients(rng):
  config = small_config(dropout_rate=0.1)
  graphdef, params = nnx.split(build(config, rng))
  tokens = random_tokens(rng, config, (2, 8))
  key = jax.random.key(int(rng.integers(1 << 30)))

  def grads(graph):
    loss = lambda p: steps_lib.cross_entropy(nnx.merge(graph, p)(tokens, dropout_key=key),
                                             tokens)
    return jax.jit(jax.grad(loss))(params)

  plain = grads(graphdef)
  for policy in [p for p in config_lib.REMATS if p != 'none']:
    graphdef_remat, _ = nnx.split(DecoderLM(dataclasses.replace(config, remat=policy),
                                            rngs=nnx.Rngs(0)))
    for a, b in zip(jax.tree.leaves(plain), jax.tree.leaves(grads(graphdef_remat))):
      np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-7,
                                 err_msg=policy)


# Several options per model (one compilation each); every MLP and every norm placement is
# among them (test_every_mlp_and_norm_placement_trains).
TRAINABLE = [
    dict(mlp='relu', norm_placement='pre', norm='layernorm', parallel_block=True,
         qk_norm=True, tie_embeddings=True),
    dict(mlp='gelu', norm_placement='post', position='learned', attention_scale='inv_d',
         dtype='bfloat16'),
    dict(mlp='swiglu', norm_placement='sandwich'),
    dict(mlp='gelu_tanh', norm_placement='deepnorm', position='alibi', remat='matmuls'),
    dict(mlp='geglu', position='sinusoidal', attention_scale='inv_cbrt_d', dropout_rate=0.1),
    dict(attention_type='mla', kv_lora_rank=16, q_lora_rank=8, qk_rope_head_dim=4,
         qk_nope_head_dim=8, v_head_dim=12)]


def test_every_mlp_and_norm_placement_trains():
  trained = [small_config(**fields) for fields in TRAINABLE]
  assert {config.mlp for config in trained} == set(config_lib.MLPS)
  assert {config.norm_placement for config in trained} == set(config_lib.NORM_PLACEMENTS)


@pytest.mark.parametrize('fields', TRAINABLE, ids=lambda f: ','.join(f'{k}={v}' for k, v in
                                                                      f.items()))
def test_trains_with_falling_loss(fields, rng):
  config = small_config(**fields)
  graphdef, params = nnx.split(build(config, rng))
  opt_config = OptimizerConfig(learning_rate=1e-2, warmup_steps=2, total_steps=20)
  optimizer = make_optimizer(opt_config)
  opt_state = optimizer.init(params)
  step = steps_lib.make_train_step(graphdef, optimizer, schedule(opt_config), seed=0,
                                   use_dropout=config.dropout_rate > 0)
  tokens = random_tokens(rng, config, (1, 4, 17))
  losses = []
  for i in range(20):
    batch = {'inputs': tokens[..., :-1], 'targets': tokens[..., 1:]}
    params, opt_state, metrics = step(params, opt_state, batch, jnp.int32(i))
    losses.append(float(metrics['loss']))
  assert all(map(math.isfinite, losses))
  assert losses[-1] < 0.75 * losses[0], losses
  assert step._cache_size() == 1  # Traced once, not once per step.


def test_gradient_accumulation_matches_one_big_batch(rng):
  config = small_config()
  graphdef, params = nnx.split(build(config, rng))
  optimizer = optax.sgd(1.0)
  step = steps_lib.make_train_step(graphdef, optimizer, lambda s: 1.0, seed=0, use_dropout=False)
  tokens = random_tokens(rng, config, (4, 9))
  copy = lambda tree: jax.tree.map(jnp.copy, tree)
  one_batch = {'inputs': tokens[None, :, :-1], 'targets': tokens[None, :, 1:]}
  four_batches = {'inputs': tokens[:, None, :-1], 'targets': tokens[:, None, 1:]}
  one, _, m1 = step(copy(params), optimizer.init(params), one_batch, jnp.int32(0))
  four, _, m4 = step(copy(params), optimizer.init(params), four_batches, jnp.int32(0))
  np.testing.assert_allclose(float(m1['loss']), float(m4['loss']), rtol=1e-6)
  for a, b in zip(jax.tree.leaves(one), jax.tree.leaves(four)):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize('updates, minibatches', [(4, 2), (3, 1)])
def test_minibatch_updates_take_the_groups_in_turn_and_are_numbered_from_step_times_updates(
    updates, minibatches, rng):
  """PPO's epochs times minibatches over 4 micro-batches equal single updates, in turn, on
  each group of 4 / minibatches micro-batches: with 2, on (0, 1), (2, 3), (0, 1), (2, 3); with
  1, on all 4 each time. The schedule reads update numbers step * updates onwards."""
  config = small_config()
  graphdef, params = nnx.split(build(config, rng))
  optimizer, rate = optax.sgd(0.5), lambda n: 1.0 / (1.0 + n)
  several = steps_lib.make_train_step(graphdef, optimizer, rate, seed=0, use_dropout=False,
                                      updates=updates, minibatches=minibatches)
  single = steps_lib.make_train_step(graphdef, optimizer, rate, seed=0, use_dropout=False)
  tokens = random_tokens(rng, config, (4, 2, 9))
  batch = {'inputs': tokens[..., :-1], 'targets': tokens[..., 1:]}
  step = int(rng.integers(0, 100))
  got, _, metrics = several(jax.tree.map(jnp.copy, params), optimizer.init(params), batch,
                            jnp.int32(step))
  expected, losses, size = params, [], 4 // minibatches
  for index in range(updates):
    first = size * (index % minibatches)
    group = jax.tree.map(lambda x: x[first:first + size], batch)
    expected, _, m = single(expected, optimizer.init(expected), group, jnp.int32(0))
    losses.append(float(m['loss']))
  np.testing.assert_allclose(float(metrics['loss']), np.mean(losses), rtol=1e-5)
  np.testing.assert_allclose(float(metrics['lr']),
                             np.mean([rate(step * updates + i) for i in range(updates)]),
                             rtol=1e-6)
  for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(expected)):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize('name,published', [('llama2-7b', 6_738_415_616),
                                            ('qwen2-0.5b', 494_032_768),
                                            ('llama3-8b', 8_030_261_248),
                                            ('qwen2-1.5b', 1_543_714_304),
                                            ('qwen2-7b', 7_615_616_512)])
def test_preset_parameter_counts_are_the_published_totals(name, published):
  assert param_count(config_lib.preset(name)) == published


@pytest.mark.parametrize('fields', [dict(), dict(mlp='gelu', use_bias=True, norm='layernorm'),
                                    dict(tie_embeddings=True, qkv_bias=True, qk_norm=True),
                                    dict(position='learned', norm_placement='sandwich')])
def test_parameter_count_formula(fields, rng):
  config = small_config(d_model=int(rng.integers(2, 9)) * 8, ffn_dim=int(rng.integers(8, 80)),
                        **fields)
  d, f, v = config.d_model, config.ffn_dim, config.vocab_size
  hd, hq, hkv = config.resolved_head_dim, config.n_heads, config.n_kv_heads
  norm = d * (2 if config.norm == 'layernorm' else 1)
  attention = d * hd * (2 * hq + 2 * hkv) + config.qkv_bias * hd * (hq + 2 * hkv)
  attention += config.use_bias * d + config.qk_norm * 2 * hd
  mlp = (3 if config.mlp in ('swiglu', 'geglu') else 2) * d * f
  mlp += config.use_bias * ((2 if config.mlp in ('swiglu', 'geglu') else 1) * f + d)
  norms_per_layer = {'pre': 2, 'post': 2, 'sandwich': 4, 'deepnorm': 2}[config.norm_placement]
  final = norm if config.norm_placement in ('pre', 'sandwich') else 0
  expected = (v * d * (1 if config.tie_embeddings else 2) + final
              + config.n_layers * (attention + mlp + norms_per_layer * norm)
              + (config.max_seq_len * d if config.position == 'learned' else 0))
  assert param_count(config) == expected


def test_rmsnorm_and_layernorm_formulas(rng):
  x = rng.standard_normal((3, 16)).astype(np.float32) * 3 + 1
  rms = RMSNorm(16, eps=1e-6, dtype=jnp.float32, param_dtype=jnp.float32)
  rms.scale[...] = jnp.asarray(rng.standard_normal(16), jnp.float32)
  expected = x / np.sqrt((x ** 2).mean(-1, keepdims=True) + 1e-6) * np.asarray(rms.scale[...])
  np.testing.assert_allclose(np.asarray(rms(jnp.asarray(x))), expected, rtol=1e-5, atol=1e-5)
  ln = LayerNorm(16, eps=1e-5, dtype=jnp.float32, param_dtype=jnp.float32)
  ln.bias[...] = jnp.asarray(rng.standard_normal(16), jnp.float32)
  mean, var = x.mean(-1, keepdims=True), x.var(-1, keepdims=True)
  expected = (x - mean) / np.sqrt(var + 1e-5) + np.asarray(ln.bias[...])
  np.testing.assert_allclose(np.asarray(ln(jnp.asarray(x))), expected, rtol=1e-5, atol=1e-5)


def test_activation_formulas(rng):
  x = rng.standard_normal(50) * 3
  erf = np.vectorize(math.erf)
  expected = {
      'relu': np.maximum(x, 0),
      'gelu': 0.5 * x * (1 + erf(x / math.sqrt(2))),
      'gelu_tanh': 0.5 * x * (1 + np.tanh(math.sqrt(2 / math.pi) * (x + 0.044715 * x ** 3))),
      'swiglu': x / (1 + np.exp(-x)),
      'geglu': 0.5 * x * (1 + erf(x / math.sqrt(2))),
  }
  for name, want in expected.items():
    got = np.asarray(ACTIVATIONS[name](jnp.asarray(x, jnp.float32)))
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5, err_msg=name)


def test_sinusoidal_table_is_the_papers_formula(rng):
  positions = rng.integers(0, 500, (2, 5))
  dim = 12
  table = np.asarray(sinusoidal_table(jnp.asarray(positions), dim))
  for (b, t), pos in np.ndenumerate(positions):
    for i in range(dim // 2):
      angle = pos / 10000 ** (2 * i / dim)
      np.testing.assert_allclose(table[b, t, 2 * i], math.sin(angle), atol=2e-4)
      np.testing.assert_allclose(table[b, t, 2 * i + 1], math.cos(angle), atol=2e-4)


@pytest.mark.parametrize('interleaved', [False, True])
def test_rope_rotates_each_pair_as_a_complex_number(interleaved, rng):
  head_dim, rotary_dim = 12, 8  # Partial rotary: the last 4 features pass unrotated.
  theta, factor = float(rng.uniform(100, 1e5)), float(rng.uniform(0.5, 1.5))
  x = rng.standard_normal((1, 4, 2, head_dim)).astype(np.float32)
  positions = rng.integers(0, 100, (1, 4))
  freqs = theta ** (-np.arange(rotary_dim // 2) * 2 / rotary_dim)
  cos, sin = rope_cos_sin(jnp.asarray(positions), jnp.asarray(freqs, jnp.float32), factor)
  got = np.asarray(apply_rope(jnp.asarray(x), cos, sin, interleaved=interleaved))
  rotary = x[..., :rotary_dim]
  real, imag = ((rotary[..., 0::2], rotary[..., 1::2]) if interleaved
                else (rotary[..., :rotary_dim // 2], rotary[..., rotary_dim // 2:]))
  z = (real + 1j * imag) * np.exp(1j * positions[..., None, None] * freqs) * factor
  expected = (np.stack([z.real, z.imag], -1).reshape(rotary.shape) if interleaved
              else np.concatenate([z.real, z.imag], -1))
  np.testing.assert_allclose(got[..., :rotary_dim], expected, rtol=1e-4, atol=1e-4)
  np.testing.assert_array_equal(got[..., rotary_dim:], x[..., rotary_dim:])


def test_rope_scores_depend_only_on_relative_position(rng):
  config = small_config(rope_scaling='{"rope_type": "yarn", "factor": 4.0, '
                        '"original_max_position_embeddings": 32}', rope_interleaved=True)
  positions = make_position_encoding(config, dtype=jnp.float32, param_dtype=jnp.float32,
                                    rngs=nnx.Rngs(0))
  q = jnp.asarray(rng.standard_normal((1, 1, 1, 8)), jnp.float32)
  k = jnp.asarray(rng.standard_normal((1, 1, 1, 8)), jnp.float32)
  i, j, shift = (int(v) for v in rng.integers(0, 30, 3))

  def score(p_q, p_k):
    rotated_q = positions.rotation(jnp.asarray([[p_q]]))(q)
    rotated_k = positions.rotation(jnp.asarray([[p_k]]))(k)
    return float(jnp.sum(rotated_q * rotated_k))

  assert math.isclose(score(i, j), score(i + shift, j + shift), rel_tol=1e-4, abs_tol=1e-4)


def test_bad_rope_scaling_is_a_config_error():
  with pytest.raises(config_lib.ConfigError, match='rope_scaling'):
    small_config(rope_scaling='{"rope_type": "yarn"')
  with pytest.raises(config_lib.ConfigError):
    small_config(rope_scaling='{"rope_type": "no-such-type"}')


def test_deepnorm_constants_follow_the_paper():
  # DeepNet, decoder-only: alpha = (2N)^(1/4), beta = (8N)^(-1/4).
  for n in (1, 6, 100):
    alpha, beta = deepnorm_constants(n)
    assert math.isclose(alpha ** 4, 2 * n) and math.isclose(beta ** -4, 8 * n)


def test_attention_scale_choices():
  config = small_config(d_model=64, n_heads=4)
  expected = {'inv_sqrt_d': 1 / 4, 'inv_d': 1 / 16, 'inv_cbrt_d': 16 ** (-1 / 3), 'none': 1.0}
  for name, value in expected.items():
    assert math.isclose(dataclasses.replace(config, attention_scale=name).softmax_scale, value)


def reference_alibi_slopes(n):
  """Press et al.'s rule, step by step: slopes of the nearest power of two below n, then
  the odd-numbered slopes of twice that many heads."""
  def power_of_two_slopes(m):
    start = 2 ** (-(2 ** -(math.log2(m) - 3)))
    return [start * start ** i for i in range(m)]
  if math.log2(n).is_integer():
    return power_of_two_slopes(n)
  closest = 2 ** math.floor(math.log2(n))
  return (power_of_two_slopes(closest)
          + power_of_two_slopes(2 * closest)[0::2][:n - closest])


def test_alibi_slopes_for_every_head_count():
  for n in range(1, 65):
    np.testing.assert_allclose(np.asarray(alibi_slopes(n)), reference_alibi_slopes(n),
                               rtol=1e-6, err_msg=str(n))
