"""Weight-only quantisation of a decoder's dense kernels: after training (PTQ, `quantize`) as
integer codes and scales that the jitted matmul de-quantises, and during training (QAT, `qat`)
as fake quantisation with a straight-through estimator. Both read one spec:

  int8 | int4, then optionally :g<N> and :asym   (int8, int4:g128, int4:g32:asym, int8:asym)

A kernel [D_in, D_out] is cut along its input axis into groups of N rows (no :g: one group of
all D_in rows, a scale per output channel); every column of a group has its own scale. For the
values w of one such group and b bits:

  symmetric:   scale = max|w| / (2^(b-1) - 1),           zero = 2^(b-1)
  asymmetric:  scale = (max(w, 0) - min(w, 0)) / (2^b - 1), zero = round(-min(w, 0) / scale)
  code  = clip(round(w / scale) + zero, 0, 2^b - 1)      (an all-zero group has scale 1)
  value = (code - zero) * scale

Symmetric codes use 2^b - 1 levels around zero (as AQT/qwix do); asymmetric ones all 2^b over
[min, max] with 0 exact (as GPTQ and AWQ's zero points). Codes are uint8; int4's are packed two
to a byte along the input axis, row 2i in the high half. Scales are float32 and the asymmetric
zero points uint8. Each division above is a product with a float32 reciprocal (1 / (2^b - 1)
rounded to float32, then 1 / scale), as XLA would rewrite a division by a constant anyway;
written so, every rounding is exact to reproduce.

Quantised: every Dense of the blocks (attention, MLP, a mixture's shared expert) and the
untied LM head; not the routers and gates, the embedding table (a gather, not a matmul) or a
mixture's stacked experts.
"""
import dataclasses
import re

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from lmlab.models import sharding
from lmlab.models.dense import Dense
from lmlab.models.errors import ConfigError
from lmlab.models.quantize import QuantizedParam

SPEC_PATTERN = re.compile(r'int(8|4)(?::g(\d+))?(:asym)?')
# Dense layers of a block that stay in floating point: they score tokens rather than
# transform them, and are a sliver of the weights.
KEPT_LAYERS = ('router', 'shared_gate')


@dataclasses.dataclass(frozen=True)
class QuantSpec:
  bits: int
  group: int  # 0: one group of all input rows (per output channel).
  asymmetric: bool

  @property
  def max_code(self) -> int:
    return 2 ** self.bits - 1

  def group_size(self, d_in: int) -> int:
    return self.group or d_in

  def fake_quantize(self, w_io):
    """w_io rounded to the values its quantisation stands for, with the gradient of the
    identity (the straight-through estimator of Bengio et al. 2013, as QAT trains)."""
    rounded_io = _values(*_codes(jax.lax.stop_gradient(w_io), self), w_io.shape, w_io.dtype)
    return w_io + jax.lax.stop_gradient(rounded_io - w_io)


def parse_spec(spec: str, field: str) -> QuantSpec:
  """'int4:g128' -> QuantSpec; field names the setting in the error."""
  match = SPEC_PATTERN.fullmatch(spec)
  if not match or match.group(2) == '0':
    raise ConfigError(f'{field}={spec!r} is not a quantisation spec: int8 or int4, then '
                      'optionally :g<group size> and :asym (e.g. int8, int4:g128, int4:g64:asym)')
  return QuantSpec(int(match.group(1)), int(match.group(2) or 0), bool(match.group(3)))


def _grouped(w_io, spec: QuantSpec):
  """[D_in, D_out] -> [G, N, D_out] float32."""
  d_in, d_out = w_io.shape
  return w_io.astype(jnp.float32).reshape(d_in // spec.group_size(d_in), -1, d_out)


def _codes(w_io, spec: QuantSpec):
  """(codes [G, N, D_out] as float32 integers, scale [G, D_out], zero [G, D_out])."""
  w_gno = _grouped(w_io, spec)
  low_go, high_go = (jnp.minimum(w_gno.min(axis=1), 0.0), jnp.maximum(w_gno.max(axis=1), 0.0))
  if spec.asymmetric:
    scale_go = (high_go - low_go) * np.float32(1 / spec.max_code)
  else:
    scale_go = jnp.maximum(high_go, -low_go) * np.float32(1 / (2 ** (spec.bits - 1) - 1))
  scale_go = jnp.where(scale_go == 0, 1.0, scale_go)
  inverse_go = 1.0 / scale_go
  if spec.asymmetric:
    zero_go = jnp.clip(jnp.round(-low_go * inverse_go), 0, spec.max_code)
  else:
    zero_go = jnp.full_like(scale_go, 2 ** (spec.bits - 1))
  codes_gno = jnp.clip(jnp.round(w_gno * inverse_go[:, None]) + zero_go[:, None], 0,
                       spec.max_code)
  return codes_gno, scale_go, zero_go


def _values(codes_gno, scale_go, zero_go, shape, dtype):
  return ((codes_gno - zero_go[:, None]) * scale_go[:, None]).reshape(shape).astype(dtype)


def check_divides(spec: QuantSpec, d_in: int, where: str, field: str):
  if d_in % spec.group_size(d_in) or (spec.bits == 4 and spec.group_size(d_in) % 2):
    raise ConfigError(f'{field}: group size {spec.group_size(d_in)} does not divide the input '
                      f'dimension {d_in} of {where} (int4 also needs an even group); pick a '
                      'divisor')


class QuantizedKernel(nnx.Module):
  """A kernel held as codes and scales; `[...]` de-quantises it, so it stands in for the
  nnx.Param it was made from wherever that is read."""

  def __init__(self, kernel: nnx.Variable, spec: QuantSpec):
    value = kernel.get_value()
    self.spec, self.shape, self.dtype = spec, tuple(value.shape), value.dtype
    in_axis, out_axis = sharding.logical_axes(kernel) or (None, None)
    codes_gno, scale_go, zero_go = _codes(value, spec)
    codes_io = codes_gno.astype(jnp.uint8).reshape(self.shape)
    if spec.bits == 4:
      codes_io = codes_io[0::2] << 4 | codes_io[1::2]
    self.codes = sharding.param(codes_io, (in_axis, out_axis), kind=QuantizedParam)
    self.scale = sharding.param(scale_go, (None, out_axis), kind=QuantizedParam)
    self.zero = (sharding.param(zero_go.astype(jnp.uint8), (None, out_axis),
                                kind=QuantizedParam) if spec.asymmetric else None)

  def __getitem__(self, index):
    codes_io = self.codes[...]
    if self.spec.bits == 4:
      codes_io = jnp.stack([codes_io >> 4, codes_io & 15], axis=1).reshape(self.shape)
    codes_gno = _grouped(codes_io, self.spec)
    zero_go = (self.zero[...].astype(jnp.float32) if self.zero is not None
               else jnp.float32(2 ** (self.spec.bits - 1)))
    return _values(codes_gno, self.scale[...], jnp.broadcast_to(zero_go, self.scale.shape),
                   self.shape, self.dtype)[index]


def quantized_layers(model):
  """(path, Dense) of each layer that weight quantisation covers."""
  return [(path, node) for path, node in nnx.iter_graph(model)
          if isinstance(node, Dense) and path and path[0] in ('blocks', 'lm_head')
          and path[-1] not in KEPT_LAYERS]


def _each_layer(model, spec: QuantSpec, field: str):
  for path, layer in quantized_layers(model):
    check_divides(spec, layer.kernel.shape[0], '/'.join(map(str, path)), field)
    yield layer


def add_fake_quant(model, spec: QuantSpec):
  """Every covered layer of `model` fake-quantises its kernel when it multiplies (QAT);
  changed in place and returned."""
  for layer in _each_layer(model, spec, 'qat'):
    layer.fake_quant = spec
  return model


def quantize_kernels(model, spec: QuantSpec):
  """Every covered layer of `model` holds its kernel as a QuantizedKernel (and no longer
  fake-quantises); changed in place and returned."""
  for layer in _each_layer(model, spec, 'quantize'):
    layer.kernel = QuantizedKernel(layer.kernel, spec)
    layer.fake_quant = None
  return model
