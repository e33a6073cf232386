"""LayerNorm and RMSNorm, computed in float32 whatever the compute dtype."""
import jax
import jax.numpy as jnp
from flax import nnx

from lmlab.models.sharding import NORM, param


class RMSNorm(nnx.Module):
  """x / rms(x) * scale (Zhang & Sennrich 2019); no mean subtraction, no bias."""

  def __init__(self, dim: int, *, eps: float, dtype, param_dtype):
    self.eps, self.dtype = eps, dtype
    self.scale = param(jnp.ones((dim,), param_dtype), (NORM,))

  def __call__(self, x):
    x32 = x.astype(jnp.float32)
    normed = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
    return (normed * self.scale[...].astype(jnp.float32)).astype(self.dtype)


class LayerNorm(nnx.Module):
  """(x - mean) / std * scale + bias (Ba et al. 2016)."""

  def __init__(self, dim: int, *, eps: float, dtype, param_dtype):
    self.eps, self.dtype = eps, dtype
    self.scale = param(jnp.ones((dim,), param_dtype), (NORM,))
    self.bias = param(jnp.zeros((dim,), param_dtype), (NORM,))

  def __call__(self, x):
    x32 = x.astype(jnp.float32)
    centred = x32 - jnp.mean(x32, axis=-1, keepdims=True)
    normed = centred * jax.lax.rsqrt(jnp.mean(centred * centred, axis=-1, keepdims=True)
                                     + self.eps)
    return (normed * self.scale[...].astype(jnp.float32)
            + self.bias[...].astype(jnp.float32)).astype(self.dtype)


def make_norm(kind: str, dim: int, *, eps: float, dtype, param_dtype):
  norm_class = {'rmsnorm': RMSNorm, 'layernorm': LayerNorm}[kind]
  return norm_class(dim, eps=eps, dtype=dtype, param_dtype=param_dtype)
