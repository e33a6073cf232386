"""RoPE inverse frequencies under every scaling scheme of Hugging Face's `rope_scaling` vocabulary.

`rope_frequencies` reads a config's `rope_scaling` dict (transformers 5 calls it `rope_parameters`)
as it stands and returns float32 inverse frequencies for the rotated part of each head together with
the attention factor that multiplies cos and sin. One small function per `rope_type`:

  default   theta^(-2i/d) (Su et al. 2021)
  linear    position interpolation: every frequency divided by `factor` (Chen et al. 2023)
  ntk       static NTK-aware scaling, base theta * factor^(d/(d-2)) from the first token on. The
            name is ours: transformers only has the dynamic form.
  dynamic   the NTK-aware base recomputed from `seq_len` once it passes max_position_embeddings
  yarn      a per-frequency ramp between extrapolation and interpolation, plus the attention
            factor from `mscale`/`mscale_all_dim` (Peng et al. 2023)
  llama3    Llama 3.1's bands: high frequencies kept, low ones interpolated, a blend between
  longrope  per-frequency `short_factor`/`long_factor`, chosen by `seq_len` (Phi-3;
            Ding et al. 2024)

As in transformers, `rope_theta` and `partial_rotary_factor` found in the dict win over the
arguments, and `original_max_position_embeddings` falls back to `max_position_embeddings`.
"""
import dataclasses
import math
from typing import Any

import jax.numpy as jnp
import numpy as np

from lmlab.models.errors import ConfigError
from lmlab.models.json_values import is_finite_number


def inverse_frequencies(theta, rotary_dim: int):
  """theta^(-2i/d) for i < d/2, float32; `theta` may be a traced scalar."""
  # The exponents come from numpy because XLA turns division by a constant into multiplication
  # by its reciprocal, which can be an ulp off; times ln(theta) that moves the frequencies ~1e-6
  # away from transformers'.
  exponents = np.arange(0, rotary_dim, 2, dtype=np.float32) / np.float32(rotary_dim)
  return 1.0 / jnp.power(jnp.float32(theta), exponents)


@dataclasses.dataclass(frozen=True)
class RopeInputs:
  """What each rope_type's function reads, with the checks that name a missing key."""

  rope_type: str
  params: dict
  theta: float
  rotary_dim: int
  max_position_embeddings: int | None
  seq_len: Any  # None, an int, or a traced integer scalar

  def require(self, key: str):
    value = self.params.get(key)
    if value is None:
      raise ConfigError(f'rope_scaling with rope_type={self.rope_type!r} needs {key!r}')
    return value

  def require_max_position_embeddings(self) -> int:
    if self.max_position_embeddings is None:
      raise ConfigError(f'rope_type={self.rope_type!r} needs max_position_embeddings')
    return self.max_position_embeddings

  def original_max_position_embeddings(self) -> int:
    if self.params.get('original_max_position_embeddings') is None and self.max_position_embeddings:
      return self.max_position_embeddings
    return self.require('original_max_position_embeddings')

  def unscaled_inv_freq(self):
    return inverse_frequencies(self.theta, self.rotary_dim)


def _default(rope: RopeInputs):
  return rope.unscaled_inv_freq(), 1.0


def _linear(rope: RopeInputs):
  return rope.unscaled_inv_freq() / rope.require('factor'), 1.0


def _ntk_aware_base(theta, scale, rotary_dim: int):
  if rotary_dim <= 2:
    raise ConfigError(f'NTK-aware scaling needs more than 2 rotary dimensions, not {rotary_dim}')
  # This exponent divides the lowest frequency by exactly `scale` and leaves the highest alone.
  return theta * scale ** (rotary_dim / (rotary_dim - 2))


def _ntk(rope: RopeInputs):
  base = _ntk_aware_base(rope.theta, rope.require('factor'), rope.rotary_dim)
  return inverse_frequencies(base, rope.rotary_dim), 1.0


def _dynamic(rope: RopeInputs):
  factor = rope.require('factor')
  max_len = rope.require_max_position_embeddings()
  excess = 0 if rope.seq_len is None else jnp.maximum(rope.seq_len - max_len, 0)
  # transformers' factor * seq_len / max_len - (factor - 1), rearranged so that float32 loses no
  # digits to cancellation.
  scale = 1.0 + excess * (factor / max_len)
  base = _ntk_aware_base(rope.theta, scale, rope.rotary_dim)
  return inverse_frequencies(base, rope.rotary_dim), 1.0


def _yarn_attention_factor(params: dict, factor: float) -> float:
  if params.get('attention_factor') is not None:
    return params['attention_factor']

  def mscale(weight):
    return 1.0 if factor <= 1 else 0.1 * weight * math.log(factor) + 1.0

  if params.get('mscale') and params.get('mscale_all_dim'):
    return mscale(params['mscale']) / mscale(params['mscale_all_dim'])
  return mscale(1.0)


def _yarn(rope: RopeInputs):
  factor = rope.require('factor')
  original_max = rope.original_max_position_embeddings()
  dim = rope.rotary_dim

  def frequency_index_turning(rotations):
    """The (fractional) frequency index whose wave turns `rotations` times in original_max."""
    return dim * math.log(original_max / (rotations * 2 * math.pi)) / (2 * math.log(rope.theta))

  low = frequency_index_turning(rope.params.get('beta_fast') or 32)
  high = frequency_index_turning(rope.params.get('beta_slow') or 1)
  if rope.params.get('truncate', True):
    low, high = math.floor(low), math.ceil(high)
  low, high = max(low, 0), min(high, dim - 1)
  if low == high:
    high += 0.001
  # numpy, for the reason given in inverse_frequencies.
  interpolated_share = np.clip((np.arange(dim // 2, dtype=np.float32) - low) / (high - low),
                               0.0, 1.0)
  inv_freq = rope.unscaled_inv_freq()
  scaled = inv_freq * (1.0 - interpolated_share) + inv_freq / factor * interpolated_share
  return scaled, _yarn_attention_factor(rope.params, factor)


def _llama3(rope: RopeInputs):
  factor = rope.require('factor')
  low_freq_factor = rope.require('low_freq_factor')
  high_freq_factor = rope.require('high_freq_factor')
  if high_freq_factor <= low_freq_factor:
    raise ConfigError(f'rope_scaling high_freq_factor={high_freq_factor} must exceed '
                      f'low_freq_factor={low_freq_factor}')
  original_max = rope.original_max_position_embeddings()
  inv_freq = rope.unscaled_inv_freq()
  wavelength = 2 * math.pi / inv_freq
  # 1 for wavelengths up to original_max / high_freq_factor, 0 from original_max / low_freq_factor.
  kept_share = jnp.clip((original_max / wavelength - low_freq_factor)
                        / (high_freq_factor - low_freq_factor), 0.0, 1.0)
  return inv_freq * ((1.0 - kept_share) / factor + kept_share), 1.0


def _longrope_factors(rope: RopeInputs, key: str):
  factors = jnp.asarray(rope.require(key), jnp.float32)
  expected = (rope.rotary_dim + 1) // 2
  if factors.shape != (expected,):
    raise ConfigError(f'rope_scaling {key!r} has {factors.size} entries; rotary dimension '
                      f'{rope.rotary_dim} needs {expected}')
  return factors


def _longrope(rope: RopeInputs):
  short_factor = _longrope_factors(rope, 'short_factor')
  long_factor = _longrope_factors(rope, 'long_factor')
  original_max = rope.original_max_position_embeddings()
  factor = rope.params.get('factor')
  if factor is None:
    factor = rope.require_max_position_embeddings() / original_max
  attention_factor = rope.params.get('attention_factor')
  if attention_factor is None:
    attention_factor = (1.0 if factor <= 1.0 else
                        math.sqrt(1.0 + math.log(factor) / math.log(original_max)))
  is_long = False if rope.seq_len is None else rope.seq_len > original_max
  return rope.unscaled_inv_freq() / jnp.where(is_long, long_factor, short_factor), attention_factor


# The keys of a rope_scaling dict that hold one positive number, and those that hold a list.
POSITIVE_NUMBERS = ('rope_theta', 'partial_rotary_factor', 'factor',
                    'original_max_position_embeddings', 'low_freq_factor', 'high_freq_factor',
                    'beta_fast', 'beta_slow', 'mscale', 'mscale_all_dim', 'attention_factor')
NUMBER_LISTS = ('short_factor', 'long_factor')


def _is_positive_number(value) -> bool:
  return is_finite_number(value) and value > 0


def _check_types(params: dict, theta):
  """ConfigError unless the dict's values (and theta) have the types the functions read."""
  for key in ('rope_type', 'type'):
    if key in params and not isinstance(params[key], str):
      raise ConfigError(f'rope_scaling {key}={params[key]!r:.60} is not a string')
  for key in POSITIVE_NUMBERS:
    if params.get(key) is not None and not _is_positive_number(params[key]):
      raise ConfigError(f'rope_scaling {key}={params[key]!r:.60} is not a positive number')
  for key in NUMBER_LISTS:
    value = params.get(key)
    if value is not None and not (isinstance(value, list)
                                  and all(map(_is_positive_number, value))):
      raise ConfigError(f'rope_scaling {key}={value!r:.60} is not a list of positive numbers')
  if not (_is_positive_number(theta) and theta > 1):
    raise ConfigError(f'rope_theta={theta!r:.60} must be a number above 1')


_FREQUENCIES_BY_TYPE = {
    'default': _default,
    'linear': _linear,
    'ntk': _ntk,
    'dynamic': _dynamic,
    'yarn': _yarn,
    'llama3': _llama3,
    'longrope': _longrope,
}


def rope_frequencies(head_dim: int, theta: float, scaling: dict | None, *,
                     partial_rotary_factor: float = 1.0,
                     max_position_embeddings: int | None = None, seq_len=None):
  """Returns (inv_freq float32 [rotary_dim / 2], attention_factor float) for a RoPE config.

  rotary_dim = int(head_dim * partial_rotary_factor). `seq_len` (an int or a traced scalar) is
  the length being processed; only `dynamic` and `longrope` read it. Raises ConfigError for an
  unknown rope_type or a missing key.
  """
  params = dict(scaling or {})
  _check_types(params, params.get('rope_theta') or theta)
  rope_type = params.get('rope_type', params.get('type', 'default'))
  if rope_type not in _FREQUENCIES_BY_TYPE:
    raise ConfigError(f'rope_scaling rope_type={rope_type!r} is not one of '
                      f'{", ".join(_FREQUENCIES_BY_TYPE)}')
  rotary_fraction = params.get('partial_rotary_factor') or partial_rotary_factor
  rope = RopeInputs(rope_type=rope_type, params=params,
                    theta=params.get('rope_theta') or theta,
                    rotary_dim=int(head_dim * rotary_fraction),
                    max_position_embeddings=max_position_embeddings, seq_len=seq_len)
  inv_freq, attention_factor = _FREQUENCIES_BY_TYPE[rope_type](rope)
  return jnp.asarray(inv_freq, jnp.float32), float(attention_factor)
