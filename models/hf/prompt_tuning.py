"""Prompt tuning (models/prompt_tuning.py) as Hugging Face peft folders, both ways.

  from lmlab.models import hf
  from lmlab.models.hf import prompt_tuning
  prompt_tuning.save_prompt(model, 'adapter', base_model_name_or_path='Qwen/Qwen2-0.5B')
  tuned = prompt_tuning.load_prompt(hf.load('Qwen2-0.5B'), 'adapter')

A peft prompt-tuning folder holds adapter_config.json (peft_type PROMPT_TUNING,
num_virtual_tokens P, token_dim D, ...) and adapter_model.safetensors with one tensor,
prompt_embeddings [P, D], which peft.PeftModel.from_pretrained puts before the inputs of the
transformers model that hf.save writes of the base. peft's inits RANDOM and SAMPLE_VOCAB are
our prompt_init 'random' and 'vocab'; a TEXT init (rows of a text's tokens) reads as 'vocab'.
"""
import dataclasses

import jax
import numpy as np
from flax import nnx

from lmlab.models.errors import CheckpointError, ConfigError
from lmlab.models.hf.peft_folders import (PROMPT_TENSOR, check_one_stack, check_type, field,
                                          read_config, read_prompt_embeddings, write)
from lmlab.models.prompt_tuning import add_prompt

INITS = {'random': 'RANDOM', 'vocab': 'SAMPLE_VOCAB'}  # Our prompt_init: peft's.
PEFT_INITS = {**{theirs: ours for ours, theirs in INITS.items()}, 'TEXT': 'vocab'}


def save_prompt(model, folder: str, *, base_model_name_or_path: str | None = None):
  """Writes the virtual tokens of `model` (peft=prompt) as a peft folder in a new or empty
  directory; the tensor keeps the parameter's dtype. base_model_name_or_path (a Hub name or
  a folder) is where peft's tools look for the base."""
  config = model.config
  if config.peft != 'prompt':
    raise CheckpointError(f'save_prompt writes a prompt-tuning adapter; this model has '
                          f'peft={config.peft!r}')
  write(folder, dict(
      peft_type='PROMPT_TUNING', base_model_name_or_path=base_model_name_or_path,
      num_virtual_tokens=config.prompt_tokens, token_dim=config.d_model,
      num_transformer_submodules=1, num_attention_heads=config.n_heads,
      num_layers=config.n_layers, prompt_tuning_init=INITS[config.prompt_init]),
      {PROMPT_TENSOR: np.asarray(model.prompt.embedding.get_value())})


def _prompt_config(adapter: dict, path: str, base):
  """The ModelConfig of `base` with the prompt tuning that adapter_config.json describes."""
  check_type(adapter, path, 'PROMPT_TUNING')
  check_one_stack(adapter, path)
  token_dim = field(adapter, path, 'token_dim', int, base.d_model)
  if token_dim != base.d_model:
    raise CheckpointError(f'{path}: token_dim={token_dim} is not the base model\'s width '
                          f'd_model={base.d_model}; is the adapter for another base?')
  init = adapter.get('prompt_tuning_init', 'RANDOM')
  if init not in PEFT_INITS:
    raise CheckpointError(f'{path}: prompt_tuning_init={init!r:.60} is not one of '
                          f'{", ".join(PEFT_INITS)}')
  try:
    return dataclasses.replace(
        base, peft='prompt', prompt_init=PEFT_INITS[init],
        prompt_tokens=field(adapter, path, 'num_virtual_tokens', int, None)).validate()
  except ConfigError as e:
    raise CheckpointError(f'{path}: {e}') from None


def load_prompt(model, folder: str):
  """A new model: `model` (a plain one, such as hf.load gives) with the virtual tokens of a
  peft prompt-tuning folder, whose adapter_config.json sets the prompt fields of its config.
  `model` is unchanged (the new one shares its arrays)."""
  adapter, config_path = read_config(folder, 'peft prompt-tuning')
  if model.config.peft:
    raise CheckpointError(f'load_prompt adds virtual tokens to a plain model, not to one with '
                          f'peft={model.config.peft!r}')
  config = _prompt_config(adapter, config_path, model.config)
  stored_yd = read_prompt_embeddings(folder, (config.prompt_tokens, config.d_model),
                                     'num_virtual_tokens, token_dim')
  dtype = model.embed.embedding.dtype
  return add_prompt(nnx.merge(*nnx.split(model)), config, rngs=nnx.Rngs(0),
                    embedding_yd=jax.device_put(np.asarray(stored_yd, dtype=dtype)))
