"""What an architecture of Hugging Face transformers is, in terms of our ModelConfig.

An `Architecture` names the ModelConfig fields all its models share (`fixed`), translates
the rest of a config.json both ways, and lists `Link`s: which checkpoint tensors become
which of our parameters, and how (a transpose, a split of a fused matrix). Loading and
saving in models/hf/__init__.py only walk these descriptions.
"""
import dataclasses
import json
import typing

from lmlab.models.errors import CheckpointError, ConfigError
from lmlab.models.config import LARGEST_SIZE, ModelConfig
from lmlab.models.json_values import is_finite_number

REQUIRED = object()
TYPE_NAMES = {int: f'an integer of at most {LARGEST_SIZE}', float: 'a finite number',
              bool: 'true or false', str: 'a string', dict: 'an object',
              list: 'a list'}


def _has_type(value, expected: type) -> bool:
  if expected is float:
    return is_finite_number(value)
  if expected is int:
    return type(value) is int and abs(value) <= LARGEST_SIZE
  return type(value) is expected


def typed(name: str, value, expected: type):
  """`value` of the config.json field `name` as the type `expected` (integers are numbers),
  else an error naming the field."""
  if not _has_type(value, expected):
    raise CheckpointError(f'config.json {name}={value!r:.60} is not {TYPE_NAMES[expected]}')
  return float(value) if expected is float else value


def field(hf_config: dict, name: str, default=REQUIRED, expected: type = int):
  """hf_config[name] as the type `expected`, or default; a missing required field is an
  error naming it."""
  if name in hf_config and hf_config[name] is not None:
    return typed(name, hf_config[name], expected)
  if default is REQUIRED:
    raise CheckpointError(f'config.json has no {name!r}, which '
                          f'{hf_config.get("architectures", ["this architecture"])[0]} needs')
  return default


def refuse(hf_config: dict, name: str, supported, why: str):
  """An error for a config.json field whose value we do not implement."""
  value = hf_config.get(name)
  if value is not None and value not in supported:
    raise CheckpointError(f'config.json {name}={value!r:.60} is not supported: {why}')


@dataclasses.dataclass(frozen=True)
class Link:
  """Checkpoint tensors `hf` <-> our parameters `ours` (paths in the model's state)."""
  hf: tuple
  ours: tuple
  to_ours: typing.Callable  # list of checkpoint arrays -> list of our arrays
  to_hf: typing.Callable    # the inverse


def copy(hf_name: str, our_path: tuple) -> Link:
  return Link((hf_name,), (our_path,), list, list)


def transpose(arrays: list) -> list:
  """A Link's transform both ways between a torch Linear's weight [out, in] and our kernel."""
  return [arrays[0].T]


def linear(hf_prefix: str, our_path: tuple, *, bias: bool) -> list:
  """A torch Linear (weight [out, in]) and our Dense (kernel [in, out])."""
  links = [Link((f'{hf_prefix}.weight',), (our_path + ('kernel',),), transpose, transpose)]
  if bias:
    links.append(copy(f'{hf_prefix}.bias', our_path + ('bias',)))
  return links


@dataclasses.dataclass(frozen=True)
class Architecture:
  name: str                     # as in config.json "architectures"
  model_type: str
  fixed: dict                   # ModelConfig fields every model of this architecture has
  config_from_hf: typing.Callable  # config.json dict -> the other ModelConfig fields
  config_to_hf: typing.Callable    # ModelConfig -> config.json dict
  links: typing.Callable           # ModelConfig -> list of Link
  # Tensors some checkpoints carry that a model does not use: buffers, and the output
  # embedding stored beside the tied input one.
  ignored: tuple = ('.rotary_emb.inv_freq', 'lm_head.weight')

  def model_config(self, hf_config: dict, **run_fields) -> ModelConfig:
    return ModelConfig(**{**self.fixed, **self.config_from_hf(hf_config), **run_fields}).validate()

  def hf_config(self, config: ModelConfig) -> dict:
    """config.json for `config`; an error names the first field this architecture cannot
    express (the config must come back unchanged from its own config.json)."""
    hf_config = {'architectures': [self.name], 'model_type': self.model_type,
                 **self.config_to_hf(config)}
    try:
      expressed = dataclasses.replace(
          self.model_config(hf_config), **{name: getattr(config, name) for name in RUN_FIELDS})
    except ConfigError as e:
      raise CheckpointError(f'{self.name} cannot express this model ({e})') from None
    for f in dataclasses.fields(ModelConfig):
      if getattr(expressed, f.name) != getattr(config, f.name):
        raise CheckpointError(f'{self.name} cannot express {f.name}={getattr(config, f.name)!r} '
                              f'(it would be {getattr(expressed, f.name)!r})')
    return hf_config


# Settings of a run rather than of the checkpoint: precision, kernels (how experts are
# computed among them), training-only settings, and Dual Chunk Attention, which is applied
# at inference to any RoPE model.
RUN_FIELDS = ('dtype', 'param_dtype', 'attention_impl', 'remat', 'dropout_rate', 'init_std',
              'dca_chunk_size', 'dca_local_size', 'moe_compute', 'moe_matmul',
              'moe_capacity_factor', 'moe_z_loss_weight')


def rope_from_hf(hf_config: dict) -> dict:
  """rope_theta and rope_scaling from either form of config.json: the older top-level
  rope_theta + rope_scaling, or the newer rope_parameters dict holding both."""
  name = 'rope_parameters' if hf_config.get('rope_parameters') else 'rope_scaling'
  parameters = dict(typed(name, hf_config[name], dict) if hf_config.get(name) else {})

  def pop_number(key):
    value = parameters.pop(key, None)
    return None if value is None else typed(f'{name}.{key}', value, float)

  theta = pop_number('rope_theta') or field(hf_config, 'rope_theta', 10000.0, expected=float)
  partial = (pop_number('partial_rotary_factor')
             or field(hf_config, 'partial_rotary_factor', None, expected=float) or 1.0)
  rope_type = parameters.get('rope_type', parameters.get('type', 'default'))
  scaling = '' if rope_type == 'default' else json.dumps(parameters, sort_keys=True)
  return dict(rope_theta=theta, rope_scaling=scaling, partial_rotary_factor=partial)


def rope_to_hf(config: ModelConfig) -> dict:
  """The older form, which transformers 4 and 5 both read."""
  fields = {'rope_theta': config.rope_theta, 'rope_scaling': config.rope_scaling_dict}
  if config.partial_rotary_factor != 1.0:
    fields['partial_rotary_factor'] = config.partial_rotary_factor
  return fields
