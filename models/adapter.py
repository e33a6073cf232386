"""Houlsby adapters (Houlsby et al. 2019): a trained bottleneck after each sublayer.

Each sublayer's output y [B, T, D] (attention's, then the MLP's, in every block) becomes
    y + up(gelu(down(y)))
with down [D, J] and up [J, D], each with a bias (J: adapter_size), before the block does
anything else with it: the placement's out_norm, the branch's dropout, the residual sum and
the sum_norm all see the adapted output (models/block.py), so under post-norm the adapter
sits before the LayerNorm as in the paper, and under parallel_block each of the two
branches has its own. The branch's dropout thus also drops the adapter's share; the adapter
has no dropout of its own.

The paper draws every adapter weight from a normal of std 1e-2 (truncated at two std), a
near-identity start. Here down is drawn so (not truncated) and up and both biases start at
zero, so an adapted model starts out computing exactly what its base does; up's gradient is
nonzero from the first step, down's from the second. The nonlinearity is GELU (exact erf
form): the paper names none beyond "a nonlinearity", and BERT, which it adapts, uses GELU.

The adapters are attributes of their Block (attn_adapter, mlp_adapter), so the base
parameters keep their paths and a pre-trained model's parameters load path by path.
"""
import jax
import jax.numpy as jnp
from flax import nnx

from lmlab.models.config import check_adds
from lmlab.models.dense import Dense
from lmlab.models.sharding import EMBED

INIT_STD = 1e-2


class AdapterParam(nnx.Param):
  """A Houlsby adapter's weight or bias: what a peft=adapter run trains."""


class HoulsbyAdapter(nnx.Module):

  def __init__(self, d_model: int, size: int, *, dtype, param_dtype, rngs: nnx.Rngs):
    def dense(d_in, d_out, axes, init_std):
      return Dense(d_in, d_out, axes=axes, use_bias=True, init_std=init_std, dtype=dtype,
                   param_dtype=param_dtype, rngs=rngs, kind=AdapterParam)

    self.down = dense(d_model, size, (EMBED, None), INIT_STD)
    self.up = dense(size, d_model, (None, EMBED), 0.0)  # Zero: the adapter starts as identity.

  def __call__(self, y_btd):
    hidden_btj = jax.nn.gelu(self.down(y_btd), approximate=False)
    return y_btd + self.up(hidden_btj).astype(y_btd.dtype)


def add_adapters(model, config, *, rngs: nnx.Rngs):
  """`model` with a HoulsbyAdapter after each sublayer of every block and `config` as its
  config; changed in place and returned. model is a decoder built from config
  (models/registry.build calls this) or from its base, without_peft(config)."""
  check_adds('adapter', config, model.config, 'add_adapters')
  dtype, param_dtype = jnp.dtype(config.dtype), jnp.dtype(config.param_dtype)
  for block in model.blocks:
    for name in ('attn_adapter', 'mlp_adapter'):
      # nnx.data: the attribute held a function (identity), which nnx takes for static.
      setattr(block, name, nnx.data(HoulsbyAdapter(config.d_model, config.adapter_size,
                                                   dtype=dtype, param_dtype=param_dtype,
                                                   rngs=rngs)))
  model.config = config
  return model
