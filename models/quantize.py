"""Block-wise quantisation of a frozen weight array, as QLoRA stores its base model (Dettmers et
al. 2023), and its exact de-quantisation.

The array is read row-major as one sequence of values, padded with zeros to whole blocks of
`block` values; each block is multiplied by the float32 reciprocal of its absmax (the largest
|value|, 1 for an all-zero block) and each quotient stored as a code:

  int8: round(quotient * 127) as an int8, de-quantised as code * absmax * float32(1 / 127)
        (XLA turns a division by a constant into that product; written so, it is exact to
        reproduce);
  nf4:  the index of the nearest NormalFloat4 value (NF4_VALUES; a quotient halfway between
        two goes to the lower one), two 4-bit indices to a uint8, the first in the high half.

Double quantisation of the absmax constants: their mean is subtracted, and the centred
constants, padded with zeros to whole groups of SCALE_BLOCK, are stored in int8 as above
(round(c / group absmax * 127), de-quantised as code * group absmax * float32(1 / 127)) with one
float32 absmax per group. The paper stores the
constants as 8-bit floats; int8 absmax is this file's choice, at the same 8 bits each and the
same group of 256, and its rounding is exact to reproduce.
"""
import math

import jax.numpy as jnp
import numpy as np
from flax import nnx

from lmlab.models import sharding

# The NormalFloat4 data type: the 16 values of the QLoRA paper's appendix E.
NF4_VALUES = (-1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453,
              -0.28444138169288635, -0.18477343022823334, -0.09105003625154495, 0.0,
              0.07958029955625534, 0.16093020141124725, 0.24611230194568634,
              0.33791524171829224, 0.44070982933044434, 0.5626170039176941,
              0.7229568362236023, 1.0)
# Absmax constants that share one second-level float32 scale.
SCALE_BLOCK = 256
INV_127 = np.float32(1 / 127)


class QuantizedParam(nnx.Variable):
  """Codes and scales of a quantised array: frozen, and no nnx.Param, so that no optimizer
  state is made for them; a checkpoint of the model's whole state holds them."""


def _blocks(flat_x, block: int):
  """flat_x [N] padded with zeros to whole blocks -> [N / block, block]."""
  return jnp.pad(flat_x, (0, -flat_x.shape[0] % block)).reshape(-1, block)


def _over_absmax(rows_xx):
  """(each row times the float32 reciprocal of its absmax, 1 for an all-zero row; the float32
  absmax of each row). XLA turns a division by a broadcast value into this product; written
  so, the rounding of every quotient is exact to reproduce."""
  absmax_x = jnp.max(jnp.abs(rows_xx), axis=1)
  return rows_xx * (1.0 / jnp.where(absmax_x == 0, 1.0, absmax_x))[:, None], absmax_x


def _int8(quotients):
  return jnp.round(quotients * 127).astype(jnp.int8)


def quantize(w, scheme: str, block: int):
  """w -> (codes_x, scale_codes_x, group_scales_x, mean): the block codes (int8, or nf4 indices
  packed two to a uint8), the double-quantised absmax of each block and their mean."""
  quotients_xx, absmax_x = _over_absmax(_blocks(jnp.asarray(w, jnp.float32).reshape(-1), block))
  if scheme == 'int8':
    codes_xx = _int8(quotients_xx)
  else:
    values = np.asarray(NF4_VALUES, np.float32)
    midpoints = jnp.asarray((values[:-1] + values[1:]) / 2)
    index_xx = jnp.searchsorted(midpoints, quotients_xx, side='left').astype(jnp.uint8)
    codes_xx = index_xx[:, 0::2] << 4 | index_xx[:, 1::2]
  mean = jnp.mean(absmax_x)
  centred_quotients_xx, group_scales_x = _over_absmax(_blocks(absmax_x - mean, SCALE_BLOCK))
  return codes_xx.reshape(-1), _int8(centred_quotients_xx).reshape(-1), group_scales_x, mean


def dequantize(codes_x, scale_codes_x, group_scales_x, mean, *, scheme: str, block: int,
               shape: tuple, dtype):
  """The array of `shape` and `dtype` that quantize's codes and scales stand for."""
  size = math.prod(shape)
  n_blocks = -(-size // block)
  scale_codes_xx = scale_codes_x.reshape(-1, SCALE_BLOCK).astype(jnp.float32)
  absmax_x = (scale_codes_xx * group_scales_x[:, None] * INV_127).reshape(-1)[:n_blocks] + mean
  if scheme == 'int8':
    values_xx = codes_x.reshape(n_blocks, block).astype(jnp.float32) * absmax_x[:, None] * INV_127
  else:
    packed_xx = codes_x.reshape(n_blocks, block // 2)
    index_xx = jnp.stack([packed_xx >> 4, packed_xx & 15], axis=-1).reshape(n_blocks, block)
    values_xx = jnp.asarray(NF4_VALUES, jnp.float32)[index_xx] * absmax_x[:, None]
  return values_xx.reshape(-1)[:size].reshape(shape).astype(dtype)


# A QuantizedArray's variables, in the order quantize returns them.
FIELDS = ('codes', 'scale_codes', 'group_scales', 'mean')


def filled_from(params, floats: dict, *, scheme: str, block: int):
  """params (a model's state) with each QuantizedArray that floats holds a float array for, at
  its own path and of its shape, holding that array quantised; the rest as it was."""
  flat = dict(nnx.to_flat_state(params))
  for path in [path[:-1] for path in flat if path[-1] == FIELDS[0]]:
    value = floats.get(path)
    if value is None:
      continue
    quantized = quantize(jnp.asarray(value), scheme, block)
    if any(flat[(*path, name)].shape != array.shape for name, array in zip(FIELDS, quantized)):
      continue
    for name, array in zip(FIELDS, quantized):
      flat[(*path, name)] = flat[(*path, name)].replace(array)
  return nnx.from_flat_state(list(flat.items()))


class QuantizedArray(nnx.Module):
  """An array held as quantize's codes and scales; `[...]` gives it de-quantised, so it stands
  in for the nnx.Param it was made from where that is only read."""

  def __init__(self, param: nnx.Variable, *, scheme: str, block: int):
    """param: the Variable quantised; its logical axes are kept for `param()`."""
    value = param.get_value()
    self.scheme, self.block = scheme, block
    self.shape, self.dtype = tuple(value.shape), value.dtype
    self.logical_axes = sharding.logical_axes(param)
    for name, array in zip(FIELDS, quantize(value, scheme, block)):
      setattr(self, name, QuantizedParam(array))

  def __getitem__(self, index):
    return dequantize(self.codes[...], self.scale_codes[...], self.group_scales[...],
                      self.mean[...], scheme=self.scheme, block=self.block, shape=self.shape,
                      dtype=self.dtype)[index]

  def param(self) -> nnx.Param:
    """The de-quantised array as an nnx.Param with the logical axes of the one quantised."""
    return sharding.param(self[...], self.logical_axes)
