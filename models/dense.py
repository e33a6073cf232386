"""A dense layer over the last axis that multiplies as one 2-D matrix product.

XLA's CPU backend runs a [B, T, D] x [D, F] product about twice as slowly as the same
product written [B*T, D] x [D, F], forward and backward; flattening the leading axes
costs nothing on other backends.
"""
import jax.numpy as jnp
from flax import nnx

from lmlab.models import sharding


def matmul_last_axis(x, w):
  """x [..., D] @ w [D, F] -> [..., F], computed as a 2-D product."""
  y = jnp.dot(x.reshape(-1, x.shape[-1]), w)
  return y.reshape(*x.shape[:-1], w.shape[-1])


class Dense(nnx.Module):
  # A weight_quant.QuantSpec under quantisation-aware training: the kernel is fake-quantised
  # as it multiplies.
  fake_quant = None
  # A pruned model's pruning.PruneMask [D_in, D_out]: the kernel's pruned weights are zeroed as
  # it multiplies, which also keeps their gradients zero.
  mask = None
  # True while pruning calibrates: the sum of squares of each input feature is sown.
  record_inputs = False

  def __init__(self, d_in: int, d_out: int, *, axes, use_bias: bool, init_std: float, dtype,
               param_dtype, rngs: nnx.Rngs, kind=nnx.Param):
    """axes: the logical names of (d_in, d_out); see models/sharding.py. kind: the Variable
    type of the kernel and bias (a PEFT method's own, for its trainable filter)."""
    self.dtype = dtype
    self.kernel = sharding.param(
        nnx.initializers.normal(init_std)(rngs.params(), (d_in, d_out), param_dtype), axes,
        kind=kind)
    self.bias = (sharding.param(jnp.zeros((d_out,), param_dtype), axes[1:], kind=kind)
                 if use_bias else None)

  def weight(self):
    """The kernel as it multiplies: fake-quantised under quantisation-aware training, pruned
    weights zeroed."""
    kernel = self.kernel[...]
    if self.fake_quant is not None:
      kernel = self.fake_quant.fake_quantize(kernel)
    return kernel if self.mask is None else jnp.where(self.mask[...], kernel, 0)

  def __call__(self, x, dropout_key=None):
    """dropout_key is for the adapter of a LoRADense (models/lora.py); a Dense has no
    dropout."""
    if self.record_inputs:
      self.sow(nnx.Intermediate, 'input_squares',
               jnp.sum(jnp.square(x.reshape(-1, x.shape[-1]).astype(jnp.float32)), axis=0))
    y = matmul_last_axis(x.astype(self.dtype), self.weight().astype(self.dtype))
    if self.bias is not None:
      y = y + self.bias[...].astype(self.dtype)
    return y
