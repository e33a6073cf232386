"""The int8 KV cache (models/kv_cache.py): codes and scales against a numpy implementation of
the formula, a model's cache against its float cache, and attention over the cache against
the plain reference attention of the rounded keys and values."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from conftest import jit_decode, small_config
from lmlab.kernels import reference
from lmlab.models import kv_cache, registry
from lmlab.models.cache_size import kv_cache_bytes_per_token
from lmlab.models.errors import ConfigError


def numpy_int8(x):
  """(codes, scales): symmetric int8 per vector along the last axis, in float32, each division
  a product with the float32 reciprocal."""
  x = np.asarray(x, np.float32)
  scale = np.max(np.abs(x), axis=-1, keepdims=True) * np.float32(1 / 127)
  inverse = np.float32(1) / np.where(scale == 0, np.float32(1), scale)
  codes = np.clip(np.round(x * inverse), -127, 127)
  return codes.astype(np.int8), scale


def test_codes_and_scales(rng):
  x = rng.normal(0.0, rng.uniform(0.1, 10.0), (2, int(rng.integers(1, 6)), 3, 16))
  x[0, 0, 0] = 0.0  # A vector of zeros keeps scale 0 and codes 0.
  codes, scale = kv_cache.quantize(jnp.asarray(x, jnp.float32))
  want_codes, want_scale = numpy_int8(x)
  np.testing.assert_array_equal(codes, want_codes)
  np.testing.assert_array_equal(scale, want_scale)
  # Rounding to nearest: every value within half a step of what is stored.
  restored = np.asarray(codes, np.float32) * np.asarray(scale)
  assert np.all(np.abs(restored - x.astype(np.float32)) <= want_scale / 2 * (1 + 1e-6))


def test_a_models_int8_cache_holds_its_float_keys_rounded(rng):
  n_layers, b, t = int(rng.integers(1, 4)), int(rng.integers(1, 4)), int(rng.integers(2, 9))
  seed = int(rng.integers(1 << 30))
  float_model = registry.build(small_config(n_layers=n_layers), rngs=nnx.Rngs(seed))
  int8_model = registry.build(small_config(n_layers=n_layers, kv_cache_dtype='int8'),
                              rngs=nnx.Rngs(seed))
  tokens_bt = jnp.asarray(rng.integers(0, 61, (b, t)), jnp.int32)
  _, float_caches = jit_decode(float_model)(tokens_bt, float_model.init_cache(b, t + 3), 0)
  empty = int8_model.init_cache(b, t + 3)
  cache_bytes = sum(leaf.nbytes for leaf in jax.tree.leaves(empty))
  assert cache_bytes == b * (t + 3) * kv_cache_bytes_per_token(int8_model.config)
  _, int8_caches = jit_decode(int8_model)(tokens_bt, empty, 0)
  # The first layer's keys and values are the float model's; later layers read rounded ones.
  for name in ('k', 'v'):
    codes, scale = numpy_int8(float_caches[0][name])
    np.testing.assert_array_equal(int8_caches[0][name], codes)
    np.testing.assert_array_equal(int8_caches[0][f'{name}_scale'], scale)


def test_attention_reads_the_rounded_keys_and_values(rng):
  config = small_config(kv_cache_dtype='int8', n_kv_heads=int(rng.choice([1, 2, 4])),
                        init_std=0.3)
  model = registry.build(config, rngs=nnx.Rngs(int(rng.integers(1 << 30))))
  attention = model.blocks[0].attention
  b, p, t = int(rng.integers(1, 4)), int(rng.integers(1, 8)), int(rng.integers(1, 4))
  x_bpd, x_btd = (jnp.asarray(rng.normal(0.0, 1.0, (b, n, 32)), jnp.float32) for n in (p, t))
  rotate_p, rotate_t = (model.positions.rotation(jnp.broadcast_to(start + jnp.arange(n), (b, n)))
                        for start, n in ((0, p), (p, t)))
  cache = kv_cache.empty(config, b, p + t, jnp.float32)
  _, cache = attention(x_bpd, rotate_p, cache=cache, cache_index=0)
  y_btd, _ = attention(x_btd, rotate_t, cache=cache, cache_index=p)

  keys, values = [], []
  for x, rotate in ((x_bpd, rotate_p), (x_btd, rotate_t)):
    k, v = attention.keys_values(x)
    keys.append(rotate(k))
    values.append(v)
  rounded = []
  for parts in (keys, values):
    codes, scale = numpy_int8(jnp.concatenate(parts, axis=1))
    rounded.append(jnp.asarray(codes.astype(np.float32) * scale))
  q_bthd = rotate_t(attention.q_proj(x_btd).reshape(b, t, 4, -1))
  expected = reference.attention(q_bthd, *rounded, causal=True, sliding_window=None,
                                 segment_ids=None, prefix_len=None, alibi_slopes=None,
                                 scale=config.softmax_scale, q_offset=p)
  np.testing.assert_allclose(y_btd, attention.o_proj(expected.reshape(b, t, -1)), atol=2e-5,
                             rtol=1e-5)


def test_bad_kv_cache_dtypes():
  with pytest.raises(ConfigError, match="kv_cache_dtype='int4' is not one of '', int8"):
    small_config(kv_cache_dtype='int4')
  with pytest.raises(ConfigError, match='attention_type=mla caches a latent'):
    small_config(kv_cache_dtype='int8', attention_type='mla', kv_lora_rank=8,
                 qk_rope_head_dim=4, qk_nope_head_dim=8, v_head_dim=8)
