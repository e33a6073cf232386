"""The position-wise feed-forward sublayer: plain (ReLU/GELU) or gated (SwiGLU/GeGLU)."""
import jax
from flax import nnx

from lmlab.models.dense import Dense
from lmlab.models.sharding import BATCH, EMBED, LENGTH, MLP as HIDDEN, constrain
from lmlab.models.stack import split_keys

ACTIVATIONS = {
    'relu': jax.nn.relu,
    'gelu': lambda x: jax.nn.gelu(x, approximate=False),
    'gelu_tanh': lambda x: jax.nn.gelu(x, approximate=True),
    'swiglu': jax.nn.silu,
    'geglu': lambda x: jax.nn.gelu(x, approximate=False),
}
GATED = ('swiglu', 'geglu')


class MLP(nnx.Module):
  """down(act(up(x))), or down(act(gate(x)) * up(x)) for gated units (Shazeer 2020)."""

  def __init__(self, config, *, init_scale: float, dtype, param_dtype, rngs, ffn_dim=None):
    """ffn_dim: the hidden units; default config.ffn_dim."""
    ffn_dim = ffn_dim or config.ffn_dim

    def linear(d_in, d_out, axes):
      return Dense(d_in, d_out, axes=axes, use_bias=config.use_bias,
                   init_std=config.init_std * init_scale, dtype=dtype, param_dtype=param_dtype,
                   rngs=rngs)

    self.kind = config.mlp
    if self.kind in GATED:
      self.gate = linear(config.d_model, ffn_dim, (EMBED, HIDDEN))
    self.up = linear(config.d_model, ffn_dim, (EMBED, HIDDEN))
    self.down = linear(ffn_dim, config.d_model, (HIDDEN, EMBED))

  def __call__(self, x_btd, dropout_key=None):
    """dropout_key: dropout inside the layers (LoRA's adapters) is on when one is given."""
    activation = ACTIVATIONS[self.kind]
    gate_key, up_key, down_key = split_keys(dropout_key, 3)
    if self.kind in GATED:
      hidden_btf = (activation(self.gate(x_btd, dropout_key=gate_key))
                    * self.up(x_btd, dropout_key=up_key))
    else:
      hidden_btf = activation(self.up(x_btd, dropout_key=up_key))
    return self.down(constrain(hidden_btf, (BATCH, LENGTH, HIDDEN)), dropout_key=down_key)
