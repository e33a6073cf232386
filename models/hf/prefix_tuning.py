"""Prefix tuning (models/prefix_tuning.py) as Hugging Face peft folders, both ways.

  from lmlab.models import hf
  from lmlab.models.hf import prefix_tuning
  prefix_tuning.save_prefix(model, 'adapter', base_model_name_or_path='Qwen/Qwen2-0.5B')
  tuned = prefix_tuning.load_prefix(hf.load('Qwen2-0.5B'), 'adapter')

A peft prefix-tuning folder holds adapter_config.json (peft_type PREFIX_TUNING,
num_virtual_tokens O, num_layers L, token_dim Hkv D, num_attention_heads Hkv, ...) and
adapter_model.safetensors with one tensor, prompt_embeddings [O, L * 2 * Hkv * D]: row o is
every layer's key then value o, which peft hands the transformers model as its KV cache. peft
folds a reparameterisation MLP into that tensor when it saves, and so do we: a folder always
holds the vectors, and reads back as prefix_projection=0.

transformers puts the row's tokens after the cache, at positions O.., where ours keep 0..;
with RoPE the two compute the same when peft's keys are ours rotated as a key at position O
(models/prefix_tuning.py), which is what is written (and undone on reading). ALiBi and no
position encoding need nothing. Learned or sinusoidal positions would read other position
embeddings, and scaled RoPE (YaRN's attention factor, dynamic NTK's length) other rotations:
those models are refused.
"""
import dataclasses

import jax.numpy as jnp
import numpy as np
from flax import nnx

from lmlab.models.errors import CheckpointError, ConfigError
from lmlab.models.hf.peft_folders import (PROMPT_TENSOR, check_one_stack, check_type, field,
                                          read_config, read_prompt_embeddings, write)
from lmlab.models.prefix_tuning import add_prefix


def _check_positions(config, what: str):
  if config.position not in ('rope', 'alibi', 'none') or config.rope_scaling:
    raise CheckpointError(f'{what}: peft runs the row after the prefix, at positions O.., '
                          f'which with position={config.position}'
                          + (f' and rope_scaling={config.rope_scaling}' if config.rope_scaling
                             else '')
                          + ' the model does not compute as it does at 0..')


def _turned(model, k_okd, position: int):
  """k_okd [O, Hkv, D] turned as the model's position encoding turns a key at `position`."""
  rotate = model.positions.rotation(jnp.full((1, k_okd.shape[0]), position))
  return rotate(k_okd[None])[0]


def save_prefix(model, folder: str, *, base_model_name_or_path: str | None = None):
  """Writes the prefixes of `model` (peft=prefix) as a peft folder in a new or empty
  directory, in the parameters' dtype. base_model_name_or_path (a Hub name or a folder) is
  where peft's tools look for the base."""
  config = model.config
  if config.peft != 'prefix':
    raise CheckpointError(f'save_prefix writes a prefix-tuning adapter; this model has '
                          f'peft={config.peft!r}')
  _check_positions(config, 'save_prefix')
  o = config.prefix_tokens
  layers = []
  for block in model.blocks:
    k_okd, v_okd = block.attention.prefix.keys_values()
    layers.append(jnp.stack([_turned(model, k_okd, o), v_okd], axis=1))  # [O, 2, Hkv, D]
  prefix_ox = jnp.stack(layers, axis=1).reshape(o, -1)
  write(folder, dict(
      peft_type='PREFIX_TUNING', base_model_name_or_path=base_model_name_or_path,
      num_virtual_tokens=o, token_dim=config.n_kv_heads * config.resolved_head_dim,
      num_transformer_submodules=1, num_attention_heads=config.n_kv_heads,
      num_layers=config.n_layers, prefix_projection=False), {PROMPT_TENSOR: np.asarray(prefix_ox)})


def _prefix_config(adapter: dict, path: str, base):
  """The ModelConfig of `base` with the prefix tuning that adapter_config.json describes."""
  check_type(adapter, path, 'PREFIX_TUNING')
  check_one_stack(adapter, path)
  expected = dict(num_layers=base.n_layers,
                  token_dim=base.n_kv_heads * base.resolved_head_dim)
  for name, value in expected.items():
    stored = field(adapter, path, name, int, value)
    if stored != value:
      raise CheckpointError(f'{path}: {name}={stored} is not the base model\'s {value}; is '
                            'the adapter for another base?')
  try:
    return dataclasses.replace(
        base, peft='prefix',
        prefix_tokens=field(adapter, path, 'num_virtual_tokens', int, None)).validate()
  except ConfigError as e:
    raise CheckpointError(f'{path}: {e}') from None


def load_prefix(model, folder: str):
  """A new model: `model` (a plain one, such as hf.load gives) with the prefixes of a peft
  prefix-tuning folder. `model` is unchanged (the new one shares its arrays)."""
  adapter, config_path = read_config(folder, 'peft prefix-tuning')
  if model.config.peft:
    raise CheckpointError(f'load_prefix adds prefixes to a plain model, not to one with '
                          f'peft={model.config.peft!r}')
  config = _prefix_config(adapter, config_path, model.config)
  _check_positions(config, config_path)
  o, kv, d = config.prefix_tokens, config.n_kv_heads, config.resolved_head_dim
  stored_ox = read_prompt_embeddings(folder, (o, config.n_layers * 2 * kv * d),
                                     'num_virtual_tokens, num_layers * 2 * token_dim')
  tuned = add_prefix(nnx.merge(*nnx.split(model)), config, rngs=nnx.Rngs(0))
  stored_olxkd = np.asarray(stored_ox).reshape(o, config.n_layers, 2, kv, d)
  for i, block in enumerate(tuned.blocks):
    prefix = block.attention.prefix
    dtype = prefix.k_okd.dtype
    prefix.k_okd[...] = _turned(tuned, jnp.asarray(stored_olxkd[:, i, 0], dtype), -o)
    prefix.v_okd[...] = jnp.asarray(stored_olxkd[:, i, 1], dtype)
  return tuned
