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

  def __call__(self, x, dropout_key=None):
    """dropout_key is for the adapter of a LoRADense (models/lora.py); a Dense has no
    dropout."""
    y = matmul_last_axis(x.astype(self.dtype), self.kernel[...].astype(self.dtype))
    if self.bias is not None:
      y = y + self.bias[...].astype(self.dtype)
    return y
