"""LoRA (Hu et al. 2021): trained low-rank updates of a decoder's projections.

A targeted Dense computes x W + b + dropout(x) A B * scale, with A [D_in, U] and B [U, D_out]
(U: the rank) the only parameters a LoRA run trains: they are nnx.LoRAParam, so the trainable
filter is nnx.LoRAParam. scale is lora_alpha / U, or lora_alpha / sqrt(U) with rsLoRA. A is
drawn as Hugging Face peft draws it and B starts at zero, so an adapted model starts out
computing what its base does.

This is ours rather than nnx.LoRA, which has neither the alpha / U (or rsLoRA) scale nor
dropout, and which nests the base layer, moving its kernel from q_proj/kernel to
q_proj/base_module/kernel: a LoRADense keeps the base parameters' paths, so a pre-trained
model's parameters load into a LoRA model path by path.

QLoRA (Dettmers et al. 2023; config.lora_quantize): each adapted layer's kernel is held as a
quantize.QuantizedArray at the same path (its codes and scales under kernel/) and
de-quantised to the compute dtype in each forward; the adapters stay float. Layers that are
not adapted keep their float kernels.
"""
import dataclasses

import jax
import jax.numpy as jnp
from flax import nnx

from lmlab.models import sharding
from lmlab.models.config import ModelConfig, check_adds, without_peft
from lmlab.models.dense import Dense, matmul_last_axis
from lmlab.models.errors import ConfigError
from lmlab.models.quantize import QuantizedArray

# Where each of config.LORA_TARGETS is in a Block: (sublayer, layer).
TARGET_PATHS = {'q': ('attention', 'q_proj'), 'k': ('attention', 'k_proj'),
                'v': ('attention', 'v_proj'), 'o': ('attention', 'o_proj'),
                'gate': ('mlp', 'gate'), 'up': ('mlp', 'up'), 'down': ('mlp', 'down')}


class LoRADense(Dense):
  """A Dense with an adapter; its kernel and bias are those of the Dense it replaces."""

  def __init__(self, base: Dense, *, rank: int, scale: float, dropout: float,
               rngs: nnx.Rngs):
    self.dtype, self.kernel, self.bias = base.dtype, base.kernel, base.bias
    kernel = base.kernel.get_value()
    d_in, d_out = kernel.shape
    in_axis, out_axis = sharding.logical_axes(base.kernel)
    # A as peft draws it (torch's kaiming_uniform_ with a=sqrt(5) of its [U, D_in] weight):
    # uniform on [-1/sqrt(D_in), 1/sqrt(D_in)].
    bound = d_in ** -0.5
    self.lora_a = sharding.param(
        jax.random.uniform(rngs.params(), (d_in, rank), kernel.dtype, -bound, bound),
        (in_axis, None), kind=nnx.LoRAParam)
    self.lora_b = sharding.param(jnp.zeros((rank, d_out), kernel.dtype), (None, out_axis),
                                 kind=nnx.LoRAParam)
    self.scale = scale
    self.dropout = nnx.Dropout(dropout)

  def __call__(self, x, dropout_key=None):
    """The adapter's dropout is on when a dropout_key is given."""
    dropped_xd = self.dropout(x.astype(self.dtype), deterministic=dropout_key is None,
                              rngs=dropout_key)
    low_xu = matmul_last_axis(dropped_xd, self.lora_a[...].astype(self.dtype))
    return (super().__call__(x)
            + matmul_last_axis(low_xu, self.lora_b[...].astype(self.dtype)) * self.scale)

  def merged_kernel(self):
    """W + A B * scale, in the kernel's dtype."""
    kernel = self.kernel[...]
    update = jnp.dot(self.lora_a[...].astype(jnp.float32), self.lora_b[...].astype(jnp.float32),
                     precision=jax.lax.Precision.HIGHEST)
    return (kernel.astype(jnp.float32) + update * self.scale).astype(kernel.dtype)


def add_lora(model, config, *, rngs: nnx.Rngs):
  """`model` with a LoRADense in place of each Dense that config.lora_targets names, in every
  block (its kernel quantised where config.lora_quantize says), and `config` as its config;
  changed in place and returned. model is a decoder built from config (models/registry.build
  calls this) or from its base, without_peft(config)."""
  check_adds('lora', config, model.config, 'add_lora')
  for name, _, sublayer, layer_name, layer in _adapted_layers(model, config):
    if layer is None:
      raise ConfigError(f'lora_targets names {name!r}, but this model has no '
                        f'{"/".join(TARGET_PATHS[name])} (mlp={config.mlp})')
    setattr(sublayer, layer_name, LoRADense(layer, rank=config.lora_rank,
                                            scale=config.lora_scale,
                                            dropout=config.lora_dropout, rngs=rngs))
  model.config = float_config(config)
  return quantized(model, config) if config.lora_quantize else model


def float_config(config: ModelConfig) -> ModelConfig:
  """config without QLoRA's quantisation: the LoRA model whose kernels a QLoRA model's
  de-quantise to."""
  return dataclasses.replace(config, lora_quantize='',
                             lora_quantize_block=ModelConfig.lora_quantize_block)


def quantized(model, config: ModelConfig):
  """A LoRA model of float_config(config) with each adapted kernel quantised as config says,
  and config as its config; changed in place and returned."""
  for *_, layer in _adapted_layers(model, config):
    layer.kernel = QuantizedArray(layer.kernel, scheme=config.lora_quantize,
                                  block=config.lora_quantize_block)
  model.config = config
  return model


def merge(model):
  """A plain model of without_peft(model.config) whose kernels are model's, each adapter folded
  into its own: W + A B * scale, and the trainable token rows' deltas into their rows.
  `model` is unchanged."""
  plain = _plain(model, LoRADense.merged_kernel)
  if model.token_rows is not None:
    model.token_rows.fold_into(plain)
  return plain


def base_model(model):
  """The plain model that model's adapters adapt: its parameters without the adapters (and
  without trainable token rows)."""
  return _plain(model, lambda layer: layer.kernel[...])


def _plain(model, kernel_of):
  """A plain model of without_peft(model.config) with model's parameters, each adapted layer's
  kernel kernel_of(layer)."""
  config = without_peft(model.config)
  values = {path: variable.get_value() for path, variable in nnx.to_flat_state(nnx.state(model))}
  for name, i, _, _, layer in _adapted_layers(model, model.config):
    values[('blocks', i, *TARGET_PATHS[name], 'kernel')] = kernel_of(layer)
  graphdef, abstract = nnx.split(nnx.eval_shape(lambda: type(model)(config, rngs=nnx.Rngs(0))))
  return nnx.merge(graphdef, nnx.from_flat_state(
      [(path, variable.replace(values[path])) for path, variable in nnx.to_flat_state(abstract)]))


def _adapted_layers(model, config):
  """(target name, block index, sublayer, layer name, layer or None where the sublayer has
  none) of each target of config in each block of model."""
  for name in config.lora_target_names:
    sublayer_name, layer_name = TARGET_PATHS[name]
    for i, block in enumerate(model.blocks):
      sublayer = getattr(block, sublayer_name)
      yield name, i, sublayer, layer_name, getattr(sublayer, layer_name, None)
