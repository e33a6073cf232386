"""Position encodings, each a pure function plus a small module.

Every encoding offers the same three hooks and leaves the others as no-ops:
  embed(x_btd, positions_bt)  adds an absolute encoding to the token embeddings;
  rotation(positions_bt)      a function that rotates queries and keys (RoPE), built
                              once per forward pass and applied in every layer;
  alibi_slopes()              per-head slopes of a distance bias, which the attention
                              kernels apply from positions (ALiBi), or None.
`make_position_encoding(config)` picks one; a new encoding is one class and one line there.
"""
import json

import jax.numpy as jnp
from flax import nnx

from lmlab.models.rope_scaling import rope_frequencies
from lmlab.models.sharding import EMBED, initializer


def sinusoidal_table(positions, dim: int):
  """Vaswani et al. 2017: PE[p, 2i] = sin(p / 10000^(2i/d)), PE[p, 2i+1] = cos(same)."""
  inv_freq = 1.0 / (10000.0 ** (jnp.arange(0, dim, 2, dtype=jnp.float32) / dim))
  angles = jnp.asarray(positions, jnp.float32)[..., None] * inv_freq
  interleaved = jnp.stack([jnp.sin(angles), jnp.cos(angles)], axis=-1)
  return interleaved.reshape(*angles.shape[:-1], dim)


def alibi_slopes(n_heads: int):
  """ALiBi's head slopes (Press et al. 2022), float32 [n_heads].

  For a power of two n, the geometric sequence 2^(-8/n), 2^(-16/n), ..., 2^(-8). Otherwise
  the sequence of the largest power of two m below n, then every other slope of the 2m
  sequence (its odd-numbered terms) until there are n.
  """
  def geometric(n):
    return [2.0 ** (-8.0 * (i + 1) / n) for i in range(n)]
  power = 1 << (n_heads.bit_length() - 1)
  slopes = geometric(power) + geometric(2 * power)[0::2][:n_heads - power]
  return jnp.asarray(slopes, jnp.float32)


def rope_cos_sin(positions_bt, inv_freq, attention_factor=1.0):
  """cos and sin [B, T, 1, F] of position * inv_freq, scaled by attention_factor (YaRN)."""
  angles_bte = jnp.asarray(positions_bt, jnp.float32)[..., None] * inv_freq
  return ((jnp.cos(angles_bte) * attention_factor)[:, :, None, :],
          (jnp.sin(angles_bte) * attention_factor)[:, :, None, :])


def apply_rope(x_bthd, cos, sin, *, interleaved=False):
  """Rotates the first 2F features of each head by the angles of cos, sin [B, T, 1, F].

  Pairs are (x[i], x[i + F]) in the rotate-half layout of Hugging Face, or (x[2i], x[2i+1])
  interleaved as in Meta's original code; features past 2F pass unrotated (partial
  rotary).
  """
  n_freq = cos.shape[-1]
  x = x_bthd.astype(jnp.float32)
  rotary, passed = x[..., :2 * n_freq], x[..., 2 * n_freq:]
  if interleaved:
    x1, x2 = rotary[..., 0::2], rotary[..., 1::2]
  else:
    x1, x2 = rotary[..., :n_freq], rotary[..., n_freq:]
  r1, r2 = x1 * cos - x2 * sin, x2 * cos + x1 * sin
  if interleaved:
    rotated = jnp.stack([r1, r2], axis=-1).reshape(rotary.shape)
  else:
    rotated = jnp.concatenate([r1, r2], axis=-1)
  return jnp.concatenate([rotated, passed], axis=-1).astype(x_bthd.dtype)


class NoPositions(nnx.Module):
  """No explicit positions; a causal decoder can still infer them (Haviv et al. 2022)."""

  def embed(self, x_btd, positions_bt):
    del positions_bt
    return x_btd

  def rotation(self, positions_bt):
    del positions_bt
    return lambda x_bthd: x_bthd

  def alibi_slopes(self):
    return None


class ALiBiPositions(NoPositions):

  def __init__(self, n_heads: int):
    self.n_heads = n_heads

  def alibi_slopes(self):
    return alibi_slopes(self.n_heads)


class LearnedPositions(NoPositions):
  """A trained table of max_seq_len absolute position vectors (GPT-2, BERT)."""

  def __init__(self, max_len: int, dim: int, *, init_std: float, dtype, param_dtype, rngs):
    self.max_len = max_len
    self.table = nnx.Embed(max_len, dim, dtype=dtype, param_dtype=param_dtype, rngs=rngs,
                           embedding_init=initializer(nnx.initializers.normal(init_std),
                                                      (None, EMBED)))

  def embed(self, x_btd, positions_bt):
    return x_btd + self.table(positions_bt)


class SinusoidalPositions(NoPositions):

  def __init__(self, dim: int):
    self.dim = dim

  def embed(self, x_btd, positions_bt):
    return x_btd + sinusoidal_table(positions_bt, self.dim).astype(x_btd.dtype)


class RotaryPositions(NoPositions):
  """RoPE (Su et al. 2021) with any Hugging Face rope scaling; see models/rope_scaling.py."""

  def __init__(self, config):
    self.head_dim, self.theta = config.rope_head_dim, config.rope_theta
    # The JSON text, not the dict: module attributes make up the graphdef, which must hash.
    self.scaling_json = config.rope_scaling
    self.partial_rotary_factor = config.partial_rotary_factor
    self.max_position_embeddings = config.max_seq_len
    self.interleaved = config.rope_interleaved

  def rotation(self, positions_bt):
    # Dynamic NTK and LongRoPE read the length in play, as Hugging Face's max position + 1.
    inv_freq, attention_factor = rope_frequencies(
        self.head_dim, self.theta, json.loads(self.scaling_json) if self.scaling_json else None,
        partial_rotary_factor=self.partial_rotary_factor,
        max_position_embeddings=self.max_position_embeddings,
        seq_len=jnp.max(positions_bt) + 1)
    cos, sin = rope_cos_sin(positions_bt, inv_freq, attention_factor)
    return lambda x_bthd: apply_rope(x_bthd, cos, sin, interleaved=self.interleaved)


def make_position_encoding(config, *, dtype, param_dtype, rngs):
  if config.position == 'learned':
    return LearnedPositions(config.max_seq_len, config.d_model, init_std=config.init_std,
                            dtype=dtype, param_dtype=param_dtype, rngs=rngs)
  if config.position == 'sinusoidal':
    return SinusoidalPositions(config.d_model)
  if config.position == 'rope':
    return RotaryPositions(config)
  if config.position == 'alibi':
    return ALiBiPositions(config.n_heads)
  return NoPositions()
