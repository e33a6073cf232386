"""Hugging Face checkpoints in and out, with numpy only (no torch at run time).

  from lmlab.models import hf
  model = hf.load('path/to/Qwen2-0.5B')      # config.json + *.safetensors
  model = hf.load('path/to/qwen2-0.5b-q8_0.gguf')   # a GGUF file (models/hf/gguf_files.py)
  logits_btv = model(input_ids, attention_mask=mask)
  hf.save(model, 'path/to/new_dir')          # a directory transformers loads

The model is our own (DecoderLM, or Bert for the BERT architectures: the config's family
picks it, models/registry.py); each architecture (models/hf/llama.py, ...) says which of
our config fields and parameters its config.json and tensors become. Tensors are read one
at a time from memory-mapped files and placed on the device as they are read, so loading
holds about one tensor on the host beside the model.
"""
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from lmlab.models.errors import CheckpointError
from lmlab.models.json_values import read_json
from lmlab.models.config import ModelConfig
from lmlab.models.hf import bert, bloom, deepseek_v2, gguf_files, llama, safetensors_files
from lmlab.models.hf.architecture import typed
from lmlab.models.registry import abstract_model

# In the order save() tries them: the first that can express a config is chosen.
ARCHITECTURES = {arch.name: arch for arch in (bloom.BLOOM, llama.QWEN3, llama.QWEN2,
                                              llama.LLAMA, llama.MISTRAL, llama.MIXTRAL,
                                              llama.QWEN3_MOE, llama.QWEN2_MOE,
                                              llama.QWEN3_SCORE,
                                              llama.QWEN2_SCORE, llama.LLAMA_SCORE,
                                              llama.MISTRAL_SCORE,
                                              deepseek_v2.DEEPSEEK_V2, bert.BERT_MODEL,
                                              bert.BERT_MASKED_LM, bert.BERT_PRETRAINING,
                                              bert.ROBERTA_MASKED_LM)}
CONFIG_FILE = 'config.json'
# Names of TensorFlow-era checkpoints (the original BERT releases) that transformers still
# reads as today's LayerNorm names; save() writes only today's.
LEGACY_SUFFIXES = {'LayerNorm.gamma': 'LayerNorm.weight', 'LayerNorm.beta': 'LayerNorm.bias'}
SHARD_BYTES = 4 << 30


def _read_json(path: str) -> dict:
  config_path = os.path.join(path, CONFIG_FILE)
  if not os.path.isdir(path):
    raise CheckpointError(f'{path} is not a directory; pass a Hugging Face checkpoint folder '
                          '(config.json and *.safetensors)')
  if not os.path.exists(config_path):
    raise CheckpointError(f'{path} has no {CONFIG_FILE}')
  hf_config = read_json(config_path, CheckpointError)
  if not isinstance(hf_config, dict):
    raise CheckpointError(f'{config_path} holds {type(hf_config).__name__}, not a JSON object')
  return hf_config


def read_config(path: str, **run_fields):
  """(architecture, ModelConfig) of a checkpoint directory or GGUF file; run_fields (dtype,
  param_dtype, attention_impl, ...) are ours to choose."""
  hf_config = gguf_files.hf_config(path) if gguf_files.is_gguf(path) else _read_json(path)
  names = hf_config.get('architectures') or []
  if not (isinstance(names, list) and all(isinstance(name, str) for name in names)):
    raise CheckpointError(f'{os.path.join(path, CONFIG_FILE)}: architectures={names!r:.60} is '
                          'not a list of names')
  supported = [name for name in names if name in ARCHITECTURES]
  if not supported:
    raise CheckpointError(f'{path}: architecture {names or "(none given)"} is not '
                          f'supported; supported: {", ".join(sorted(ARCHITECTURES))}')
  architecture = ARCHITECTURES[supported[0]]
  return architecture, architecture.model_config(hf_config, **run_fields)


def _stored_names(checkpoint) -> dict:
  """{today's tensor name: the name stored in the checkpoint}."""
  stored = {}
  for name in sorted(checkpoint.names()):
    modern = next((name[:-len(old)] + new for old, new in LEGACY_SUFFIXES.items()
                   if name.endswith(old)), name)
    if modern in stored:
      raise CheckpointError(f'the checkpoint holds both {stored[modern]!r} and {name!r}, '
                            'two names of one tensor')
    stored[modern] = name
  return stored


def end_token_id(path: str):
  """The checkpoint's end-of-sequence id (the first, if config.json lists several)."""
  eos = (gguf_files.hf_config(path) if gguf_files.is_gguf(path) else _read_json(path)).get(
      'eos_token_id')
  first = eos[0] if isinstance(eos, list) and eos else eos
  return None if first is None else typed('eos_token_id', first, int)


def load(path: str, *, dtype: str = 'float32', param_dtype: str | None = None,
         **run_fields):
  """The model stored in a Hugging Face directory, parameters in param_dtype (default:
  dtype); run_fields set other ModelConfig fields that are not the checkpoint's to decide
  (attention_impl, DCA at inference)."""
  architecture, config = read_config(path, dtype=dtype, param_dtype=param_dtype or dtype,
                                     **run_fields)
  if config.peft:
    raise CheckpointError(f'load reads a plain model, not peft={config.peft!r}; add an adapter '
                          'to it with registry.build\'s add_lora or add_prompt, or read a peft '
                          'folder with lmlab.models.hf.adapters.load')
  checkpoint = (gguf_files.checkpoint(path) if gguf_files.is_gguf(path)
                else safetensors_files.Checkpoint(path))
  stored = _stored_names(checkpoint)
  graphdef, abstract = nnx.split(abstract_model(config))
  shapes = {path: variable for path, variable in nnx.to_flat_state(abstract)}
  values, used = {}, set()
  for link in architecture.links(config):
    read = [checkpoint.read(stored.get(name, name)) for name in link.hf]
    try:
      arrays = link.to_ours(read)
    except ValueError:  # A split or reshape that the tensor's shape does not allow.
      raise CheckpointError(f'tensor {" / ".join(link.hf)} has shape '
                            f'{" / ".join(str(a.shape) for a in read)}, which does not fit '
                            f'{architecture.name} as config.json describes it') from None
    for our_path, array in zip(link.ours, arrays):
      expected = shapes[our_path]
      if tuple(array.shape) != tuple(expected.shape):
        raise CheckpointError(f'tensor {" / ".join(link.hf)} has shape {tuple(array.shape)}; '
                              f'config.json implies {tuple(expected.shape)}')
      values[our_path] = jax.device_put(np.asarray(array, dtype=expected.dtype))
    used.update(link.hf)
  unused = sorted(stored[name] for name in stored.keys() - used
                  if not name.endswith(architecture.ignored))
  if unused:
    raise CheckpointError(f'{len(unused)} checkpoint tensors have no place in {architecture.name} '
                          f'as config.json describes it, e.g. {unused[0]!r}')
  state = nnx.from_flat_state([(p, shapes[p].replace(values[p])) for p in shapes])
  return nnx.merge(graphdef, state)


def architecture_for(config: ModelConfig, name: str | None = None):
  """The architecture `name`, or the first one that can express `config`."""
  if name is not None:
    if name not in ARCHITECTURES:
      raise CheckpointError(f'unknown architecture {name!r}; choose one of '
                            f'{", ".join(sorted(ARCHITECTURES))}')
    return ARCHITECTURES[name]
  reasons = []
  for architecture in ARCHITECTURES.values():
    try:
      architecture.hf_config(config)
      return architecture
    except CheckpointError as e:
      reasons.append(str(e))
  raise CheckpointError('no Hugging Face architecture expresses this model: '
                        + '; '.join(reasons))


def hf_tensors(model, architecture: str | None = None):
  """(config.json, an iterator of (tensor name, numpy array)) of the Hugging Face model that
  `model` is, in the architecture `name` or the first that can express it."""
  config = model.config
  if config.peft:
    raise CheckpointError(f'save writes a plain model, and this one has peft={config.peft!r} '
                          'adapters: merge them into it first (LoRA: lmlab.models.lora.merge), or '
                          'write them alone with lmlab.models.hf.adapters.save')
  arch = architecture_for(config, architecture)
  hf_config = arch.hf_config(config)
  params = {p: v for p, v in nnx.to_flat_state(nnx.state(model, nnx.Param))}

  def tensors():
    for link in arch.links(config):
      yield from zip(link.hf, link.to_hf([np.asarray(params[p][...]) for p in link.ours]))
  return hf_config, tensors()


def save(model, path: str, *, architecture: str | None = None,
         shard_bytes: int = SHARD_BYTES, pad_token_id: int | None = None):
  """Writes config.json and safetensors shards (with an index when there are several) into
  a new or empty directory `path`; tensors keep the model's parameter dtype. pad_token_id,
  when given, goes into config.json (a sequence classifier of transformers needs it to find
  the last token of each padded row)."""
  config = model.config
  hf_config, tensors = hf_tensors(model, architecture)
  if os.path.exists(path) and (not os.path.isdir(path) or os.listdir(path)):
    raise CheckpointError(f'{path} exists and is not an empty directory; choose a new path')
  os.makedirs(path, exist_ok=True)
  written, shard, size = [], {}, 0

  def write_shard():
    name = f'shard-{len(written)}.partial'
    safetensors_files.write(os.path.join(path, name), shard)
    written.append((name, sorted(shard), sum(a.nbytes for a in shard.values())))

  for name, array in tensors:
    if shard and size + array.nbytes > shard_bytes:
      write_shard()
      shard, size = {}, 0
    shard[name], size = array, size + array.nbytes
  write_shard()

  final = ([safetensors_files.SINGLE_FILE] if len(written) == 1 else
           [f'model-{i + 1:05d}-of-{len(written):05d}.safetensors' for i in range(len(written))])
  for (partial, _, _), name in zip(written, final):
    os.rename(os.path.join(path, partial), os.path.join(path, name))
  if len(written) > 1:
    index = {'metadata': {'total_size': sum(nbytes for _, _, nbytes in written)},
             'weight_map': {tensor: name for (_, tensors, _), name in zip(written, final)
                            for tensor in tensors}}
    with open(os.path.join(path, safetensors_files.INDEX_FILE), 'x') as f:
      json.dump(index, f, indent=2)
  hf_config['torch_dtype'] = str(jnp.dtype(config.param_dtype))
  if pad_token_id is not None:
    hf_config['pad_token_id'] = pad_token_id
  with open(os.path.join(path, CONFIG_FILE), 'x') as f:
    json.dump(hf_config, f, indent=2)
