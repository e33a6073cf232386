"""Multi-head latent attention: the paper's equations, cached (absorbed) decoding, what the cache
holds, cache sizes per token and parameter counts (training: tests/test_model.py)."""
import math

import jax
import jax.extend
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from conftest import small_config
from test_model import (build, check_cached_decoding_equals_full_forward, decode_in_steps,
                        random_tokens)
from lmlab.models import config as config_lib
from lmlab.models.cache_size import kv_cache_bytes_per_token, kv_cache_elements_per_token
from lmlab.models.registry import param_count
from lmlab.models.mla import LatentAttention, latent_softmax_scale

MLA = dict(attention_type='mla', kv_lora_rank=16, qk_rope_head_dim=4, qk_nope_head_dim=8,
           v_head_dim=12)


def mla_config(**fields):
  return small_config(**{**MLA, **fields})


def rotation_by_angles(angles_bti):
  """A position encoding for the test: rotates pair (2i, 2i+1) of the last axis by angle i."""
  cos, sin = jnp.cos(angles_bti)[:, :, None, :], jnp.sin(angles_bti)[:, :, None, :]

  def rotate(x_bthr):
    x1, x2 = x_bthr[..., 0::2], x_bthr[..., 1::2]
    return jnp.stack([x1 * cos - x2 * sin, x2 * cos + x1 * sin], -1).reshape(x_bthr.shape)
  return rotate


def paper_mla(x_btd, params, config, angles_bti, segments_bt, prefix_b):
  """Equations (37)-(47) of DeepSeek-V2, one head at a time, in float64 numpy; causal, or
  within segments, or bidirectional over a prefix.

  Hugging Face's layout: kv_a_proj_with_mqa = [W^DKV | W^KR]; per head h, q_b_proj (or q_proj)
  columns [W^UQ_h | W^QR_h] and kv_b_proj columns [W^UK_h | W^UV_h].
  """
  p = {name: np.asarray(value, np.float64) for name, value in params.items()}
  b, t, _ = x_btd.shape
  h_n, n, r, c, v = (config.n_heads, config.qk_nope_head_dim, config.qk_rope_head_dim,
                     config.kv_lora_rank, config.v_head_dim)

  def rms_norm(z, scale):
    return z / np.sqrt(np.mean(z * z, -1, keepdims=True) + 1e-6) * scale

  def rope(z_tr, angles_ti):  # (z[2i] + i z[2i+1]) * e^(i angle)
    turned = (z_tr[:, 0::2] + 1j * z_tr[:, 1::2]) * np.exp(1j * angles_ti)
    return np.stack([turned.real, turned.imag], -1).reshape(z_tr.shape)

  out = np.zeros((b, t, config.d_model))
  for bi in range(b):
    x = np.asarray(x_btd[bi], np.float64)
    if config.q_lora_rank:
      c_q = rms_norm(x @ p['q_a_proj'], p['q_a_layernorm'])
      q_all = c_q @ p['q_b_proj']
    else:
      q_all = x @ p['q_proj']
    c_kv = rms_norm(x @ p['kv_a_proj_with_mqa'][:, :c], p['kv_a_layernorm'])
    k_rope = rope(x @ p['kv_a_proj_with_mqa'][:, c:], angles_bti[bi])
    visible = np.tril(np.ones((t, t), bool))
    if segments_bt is not None:
      visible &= segments_bt[bi][:, None] == segments_bt[bi][None, :]
    if prefix_b is not None:
      visible[:prefix_b[bi], :prefix_b[bi]] = True
    heads = []
    for h in range(h_n):
      q_h = q_all[:, h * (n + r):(h + 1) * (n + r)]
      w_h = p['kv_b_proj'][:, h * (n + v):(h + 1) * (n + v)]
      q = np.concatenate([q_h[:, :n], rope(q_h[:, n:], angles_bti[bi])], -1)
      k = np.concatenate([c_kv @ w_h[:, :n], k_rope], -1)
      scores = np.where(visible, q @ k.T / math.sqrt(n + r), -np.inf)
      weights = np.exp(scores - scores.max(-1, keepdims=True))
      heads.append(weights / weights.sum(-1, keepdims=True) @ (c_kv @ w_h[:, n:]))
    out[bi] = np.concatenate(heads, -1) @ p['o_proj']
  return out


@pytest.mark.parametrize('q_lora_rank,mask', [(0, 'causal'), (8, 'packed'), (8, 'prefix')])
def test_forward_equals_the_papers_equations(q_lora_rank, mask, rng):
  config = mla_config(q_lora_rank=q_lora_rank, init_std=0.3)
  attention = LatentAttention(config, out_init_scale=1.0, dtype=jnp.float32,
                              param_dtype=jnp.float32,
                              rngs=nnx.Rngs(int(rng.integers(1 << 30))))
  params = {'kv_a_proj_with_mqa': attention.kv_a_proj_with_mqa.kernel[...],
            'kv_b_proj': attention.kv_b_proj.kernel[...], 'o_proj': attention.o_proj.kernel[...]}
  norms = [('kv_a_layernorm', config.kv_lora_rank)]
  if q_lora_rank:
    params.update(q_a_proj=attention.q_a_proj.kernel[...], q_b_proj=attention.q_b_proj.kernel[...])
    norms.append(('q_a_layernorm', q_lora_rank))
  else:
    params['q_proj'] = attention.q_proj.kernel[...]
  for name, dim in norms:
    scale = jnp.asarray(rng.uniform(0.5, 1.5, dim), jnp.float32)
    getattr(attention, name).scale[...] = scale
    params[name] = scale

  b, t = 2, 9
  x_btd = jnp.asarray(rng.standard_normal((b, t, config.d_model)), jnp.float32)
  angles_bti = rng.uniform(0, 2 * math.pi, (b, t, config.qk_rope_head_dim // 2))
  segments_bt = np.sort(rng.integers(0, 3, (b, t)), axis=1) if mask == 'packed' else None
  prefix_b = rng.integers(0, t + 1, b) if mask == 'prefix' else None
  expected = paper_mla(np.asarray(x_btd), params, config, angles_bti, segments_bt, prefix_b)

  rotate = rotation_by_angles(jnp.asarray(angles_bti, jnp.float32))
  graphdef, state = nnx.split(attention)
  attend = jax.jit(lambda state, x_btd, kwargs: nnx.merge(graphdef, state)(x_btd, rotate,
                                                                           **kwargs))
  full, _ = attend(state, x_btd, dict(
      segment_ids_bt=None if segments_bt is None else jnp.asarray(segments_bt),
      prefix_len_b=None if prefix_b is None else jnp.asarray(prefix_b)))
  np.testing.assert_allclose(np.asarray(full), expected, rtol=1e-4, atol=1e-4)
  if mask == 'causal':  # The absorbed path, prefilling an empty cache with the whole input.
    cache = {'c_kv': jnp.zeros((b, t + 3, config.kv_lora_rank)),
             'k_rope': jnp.zeros((b, t + 3, config.qk_rope_head_dim))}
    cached, _ = attend(state, x_btd, dict(cache=cache, cache_index=0))
    np.testing.assert_allclose(np.asarray(cached), expected, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize('fields', [
    dict(), dict(q_lora_rank=8), dict(q_lora_rank=8, position='alibi', norm_placement='deepnorm'),
    dict(sliding_window=3, attention_impl='xla'),
    dict(rope_interleaved=True, rope_scaling='{"rope_type": "yarn", "factor": 4.0, '
         '"original_max_position_embeddings": 8, "mscale": 0.707, "mscale_all_dim": 0.707}')])
def test_cached_decoding_equals_full_forward(fields, rng):
  check_cached_decoding_equals_full_forward(mla_config(**fields), rng)


def test_cache_holds_only_the_latent_and_the_rope_key(rng):
  config = mla_config(q_lora_rank=8)
  model = build(config, rng)
  b, length = 2, 12
  _, caches = decode_in_steps(model, random_tokens(rng, config, (b, 7)), 4, length)
  assert len(caches) == config.n_layers
  for cache in caches:
    shapes = sorted(leaf.shape for leaf in jax.tree.leaves(cache))
    assert shapes == sorted([(b, length, config.kv_lora_rank),
                             (b, length, config.qk_rope_head_dim)])


def test_decoding_never_expands_the_cache_per_head(rng):
  """No value computed in a decode step over a cache of L positions is as large as keys or
  values of every head for those positions would be."""
  config = mla_config(n_heads=8, attention_impl='xla')
  model = build(config, rng)
  b, length = 2, 37
  per_head = config.n_heads * min(config.qk_nope_head_dim, config.v_head_dim)
  assert per_head > config.kv_lora_rank + config.qk_rope_head_dim
  graphdef, state = nnx.split(model)
  step = lambda st, token, caches: nnx.merge(graphdef, st).decode(token, caches, 5)
  jaxpr = jax.make_jaxpr(step)(state, jnp.zeros((b, 1), jnp.int32), model.init_cache(b, length))

  def sizes_over_cache(jaxpr):
    for eqn in jaxpr.eqns:
      for var in eqn.outvars:
        if length in getattr(var.aval, 'shape', ()):
          yield var.aval.size
    for sub in jax.extend.core.subjaxprs(jaxpr):
      yield from sizes_over_cache(sub)

  sizes = list(sizes_over_cache(jaxpr.jaxpr))
  assert sizes and max(sizes) < b * length * per_head


def paper_cache_elements(kind, n_h, n_g, d_h, d_c, d_r, n_layers):
  """Table 1 of DeepSeek-V2."""
  return {'mha': 2 * n_h * d_h * n_layers, 'gqa': 2 * n_g * d_h * n_layers,
          'mqa': 2 * d_h * n_layers, 'mla': (d_c + d_r) * n_layers}[kind]


def test_cache_size_formulas_are_the_papers(rng):
  n_g, n_h = 2, 8
  d_h, d_r = 4 * int(rng.integers(2, 32)), 2 * int(rng.integers(1, 32))
  d_c = int(rng.integers(8, 512))
  n_layers = int(rng.integers(1, 60))
  shape = dict(d_model=n_h * d_h, n_heads=n_h, n_layers=n_layers)
  configs = {'mha': small_config(n_kv_heads=n_h, **shape),
             'gqa': small_config(n_kv_heads=n_g, **shape),
             'mqa': small_config(n_kv_heads=1, **shape),
             'mla': small_config(attention_type='mla', kv_lora_rank=d_c, qk_rope_head_dim=d_r,
                                 qk_nope_head_dim=d_h, v_head_dim=d_h, **shape)}
  for kind, config in configs.items():
    expected = paper_cache_elements(kind, n_h, n_g, d_h, d_c, d_r, n_layers)
    assert kv_cache_elements_per_token(config) == expected, kind
    assert kv_cache_bytes_per_token(config, jnp.bfloat16) == 2 * expected, kind
    assert kv_cache_bytes_per_token(config) == 4 * expected, kind
  # DeepSeek-V2's own choice, d_c = 4 d_h and d_h^R = d_h / 2: 4.5 d_h l, GQA with 2.25 groups.
  config = small_config(attention_type='mla', kv_lora_rank=4 * d_h, qk_rope_head_dim=d_h // 2,
                        qk_nope_head_dim=d_h, v_head_dim=d_h, **shape)
  assert kv_cache_elements_per_token(config) == 4.5 * d_h * n_layers


@pytest.mark.parametrize('fields', [dict(n_kv_heads=1), dict(n_kv_heads=2, dtype='bfloat16'),
                                    dict(MLA), dict(MLA, q_lora_rank=8, dtype='bfloat16')])
def test_cache_size_is_what_init_cache_allocates(fields, rng):
  config = small_config(**fields)
  model = build(config, rng)
  b, length = int(rng.integers(1, 4)), int(rng.integers(1, 20))
  allocated = sum(leaf.nbytes for leaf in jax.tree.leaves(model.init_cache(b, length)))
  assert allocated == b * length * kv_cache_bytes_per_token(config)


@pytest.mark.parametrize('fields', [dict(), dict(q_lora_rank=8, qkv_bias=True, use_bias=True)])
def test_parameter_count_formula(fields, rng):
  config = mla_config(**fields)
  d, h, f = config.d_model, config.n_heads, config.ffn_dim
  c, r, n, v, q = (config.kv_lora_rank, config.qk_rope_head_dim, config.qk_nope_head_dim,
                   config.v_head_dim, config.q_lora_rank)
  # W^DQ, its norm, W^UQ and W^QR; or one W^Q.
  queries = d * q + q + q * h * (n + r) + config.qkv_bias * q if q else d * h * (n + r)
  # W^DKV and W^KR (one matrix), the latent's norm, W^UK and W^UV, W^O.
  keys_values = d * (c + r) + config.qkv_bias * (c + r) + c + c * h * (n + v)
  attention = queries + keys_values + h * v * d + config.use_bias * d
  mlp = 3 * d * f + config.use_bias * (2 * f + d)
  expected = 2 * config.vocab_size * d + d + config.n_layers * (attention + mlp + 2 * d)
  assert param_count(config) == expected


def test_yarn_softmax_scale_follows_deepseek():
  plain = mla_config()
  assert latent_softmax_scale(plain) == (8 + 4) ** -0.5
  yarn = mla_config(rope_scaling='{"rope_type": "yarn", "factor": 40, "mscale": 0.707, '
                    '"mscale_all_dim": 0.707, "original_max_position_embeddings": 16}')
  assert math.isclose(latent_softmax_scale(yarn),
                      12 ** -0.5 * (0.1 * 0.707 * math.log(40) + 1) ** 2)


@pytest.mark.parametrize('fields,match', [
    (dict(kv_lora_rank=0), 'kv_lora_rank'), (dict(v_head_dim=-1), 'v_head_dim'),
    (dict(qk_rope_head_dim=3), 'even qk_rope_head_dim'), (dict(qk_norm=True), 'qk_norm'),
    (dict(q_lora_rank=-2), 'q_lora_rank'), (dict(dca_chunk_size=8), 'dual chunk')])
def test_bad_mla_configs_are_errors(fields, match):
  with pytest.raises(config_lib.ConfigError, match=match):
    mla_config(**fields)
