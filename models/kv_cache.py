"""One attention layer's KV cache, held in the compute dtype or as int8.

config.kv_cache_dtype='' keeps keys and values as computed. 'int8' stores each position's
key (and value) of each KV head as int8 codes with one float32 scale, symmetric and rounded
to nearest: scale = max|x| / 127 over the head's D features, code = round(x / scale), each
division a product with a float32 reciprocal (as XLA rewrites a division by a constant, so
the formula is exact in numpy too). Reading multiplies back, so attention runs in the
compute dtype on values within scale / 2 of the originals. Per head and position, the cache
takes D + 4 bytes instead of D times the compute dtype's size (about half of bfloat16's, a
quarter of float32's at D = 64).

Axes: B batch, S cache positions, T positions written now, K KV heads, D head features.
"""
import jax
import jax.numpy as jnp
import numpy as np

KV_CACHE_DTYPES = ('', 'int8')
INT8_MAX = 127


def empty(config, batch: int, length: int, dtype):
  """A layer's cache for `length` positions, zero-filled."""
  shape = (batch, length, config.n_kv_heads, config.resolved_head_dim)
  if config.kv_cache_dtype == 'int8':
    scale_shape = shape[:-1] + (1,)
    return {'k': jnp.zeros(shape, jnp.int8), 'v': jnp.zeros(shape, jnp.int8),
            'k_scale': jnp.zeros(scale_shape, jnp.float32),
            'v_scale': jnp.zeros(scale_shape, jnp.float32)}
  return {'k': jnp.zeros(shape, dtype), 'v': jnp.zeros(shape, dtype)}


def quantize(x_btkd):
  """(int8 codes, float32 scales [..., 1]) of x, one scale per vector along the last axis."""
  x_btkd = x_btkd.astype(jnp.float32)
  scale_btk1 = jnp.max(jnp.abs(x_btkd), axis=-1, keepdims=True) * np.float32(1 / INT8_MAX)
  codes = jnp.round(x_btkd * (1.0 / jnp.where(scale_btk1 == 0, 1.0, scale_btk1)))
  return jnp.clip(codes, -INT8_MAX, INT8_MAX).astype(jnp.int8), scale_btk1


def write(cache, k_btkd, v_btkd, index):
  """The cache with this call's keys and values at positions index.. ."""
  updated = dict(cache)
  for name, x_btkd in (('k', k_btkd), ('v', v_btkd)):
    start = (0, index) + (0,) * (x_btkd.ndim - 2)
    if f'{name}_scale' in cache:
      x_btkd, scale_btk1 = quantize(x_btkd)
      updated[f'{name}_scale'] = jax.lax.dynamic_update_slice(cache[f'{name}_scale'],
                                                              scale_btk1, start)
    updated[name] = jax.lax.dynamic_update_slice(cache[name], x_btkd.astype(cache[name].dtype),
                                                 start)
  return updated


def read(cache, dtype):
  """(keys, values) of every cached position, in dtype."""
  def values(name):
    if f'{name}_scale' not in cache:
      return cache[name]
    return (cache[name].astype(jnp.float32) * cache[f'{name}_scale']).astype(dtype)
  return values('k'), values('v')
