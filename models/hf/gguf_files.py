"""GGUF files (llama.cpp, Ollama) of the Llama, Mistral, Qwen2 and Qwen3 families, read with
llama.cpp's own `gguf` package, as a Hugging Face folder: the metadata becomes a config.json
dictionary and the tensors take their Hugging Face names, so the model loads through the same
Architecture tables (models/hf/llama.py).

Tensors are de-quantised to float32 as they are read (F32, F16, BF16, Q8_0, Q4_0, Q4_1, Q5_0,
Q5_1 and the K-quants Q2_K..Q6_K: whatever `gguf.quants.dequantize` reads). llama.cpp's
converter reorders the rows of LLaMA's q and k projections (it pairs rotary dimensions
i and i + d/2 as neighbours); reading undoes that. Qwen's are stored as they are.
"""
import functools
import os

import numpy as np

from lmlab.models.errors import CheckpointError

# GGUF general.architecture -> (Hugging Face architecture, rows of q/k reordered).
ARCHITECTURES = {'llama': ('LlamaForCausalLM', True), 'qwen2': ('Qwen2ForCausalLM', False),
                 'qwen3': ('Qwen3ForCausalLM', False)}
# Per-layer tensor names: GGUF's -> Hugging Face's (after model.layers.N.).
LAYER_TENSORS = {'attn_norm': 'input_layernorm', 'ffn_norm': 'post_attention_layernorm',
                 'attn_q': 'self_attn.q_proj', 'attn_k': 'self_attn.k_proj',
                 'attn_v': 'self_attn.v_proj', 'attn_output': 'self_attn.o_proj',
                 'attn_q_norm': 'self_attn.q_norm', 'attn_k_norm': 'self_attn.k_norm',
                 'ffn_gate': 'mlp.gate_proj', 'ffn_up': 'mlp.up_proj',
                 'ffn_down': 'mlp.down_proj'}
TOP_TENSORS = {'token_embd': 'model.embed_tokens', 'output_norm': 'model.norm',
               'output': 'lm_head'}


def is_gguf(path: str) -> bool:
  return path.endswith('.gguf')


def _reader(path: str):
  try:
    import gguf
  except ImportError:
    raise CheckpointError(f'{path} is a GGUF file, which needs the gguf package: pip install '
                          "gguf (or 'lmlab[gguf]')") from None
  if not os.path.isfile(path):
    raise CheckpointError(f'{path} does not exist; pass a .gguf file')
  try:
    return gguf.GGUFReader(path)
  except (ValueError, OSError, IndexError, KeyError) as error:  # What a damaged file raises.
    raise CheckpointError(f'{path} is not a readable GGUF file ({error}); it may be '
                          'truncated') from None


def metadata(reader) -> dict:
  """The file's key-value metadata as Python values (strings, numbers, lists)."""
  return {name: field.contents() for name, field in reader.fields.items()
          if not name.startswith('GGUF.')}


def _hf_name(path: str, name: str) -> str:
  parts = name.split('.')
  if parts[0] == 'blk' and len(parts) == 4 and parts[2] in LAYER_TENSORS:
    return f'model.layers.{parts[1]}.{LAYER_TENSORS[parts[2]]}.{parts[3]}'
  if len(parts) == 2 and parts[0] in TOP_TENSORS:
    return f'{TOP_TENSORS[parts[0]]}.{parts[1]}'
  raise CheckpointError(f'{path}: tensor {name!r} has no place in the Llama/Qwen '
                        'architectures read here')


def _unpermuted(rows: np.ndarray, n_heads: int) -> np.ndarray:
  """The inverse of llama.cpp's reordering: within each head, row 2i + j (j = 0, 1) goes
  back to row i + j d/2."""
  shape = rows.shape
  return rows.reshape(n_heads, shape[0] // n_heads // 2, 2, *shape[1:]).swapaxes(1, 2).reshape(
      shape)


class Checkpoint:
  """A GGUF file with a Hugging Face folder's tensor names (safetensors_files.Checkpoint's
  interface): names() and read(name) -> float32 numpy array in Hugging Face's layout."""

  def __init__(self, path: str):
    self.path, self.reader = path, _reader(path)
    self.metadata = metadata(self.reader)
    self.architecture = _architecture(path, self.metadata)
    self.tensors = {_hf_name(path, tensor.name): tensor for tensor in self.reader.tensors}

  def names(self):
    return self.tensors.keys()

  def read(self, name: str) -> np.ndarray:
    from gguf import quants
    tensor = self.tensors.get(name)
    if tensor is None:
      raise CheckpointError(f'{self.path} has no tensor for {name!r}')
    try:
      array = quants.dequantize(tensor.data, tensor.tensor_type)
    except NotImplementedError:
      raise CheckpointError(f'{self.path}: tensor {tensor.name!r} is of type '
                            f'{tensor.tensor_type.name}, which the gguf package cannot '
                            'de-quantise') from None
    array = np.asarray(array, np.float32).reshape(tuple(reversed(tensor.shape.tolist())))
    _, permuted = ARCHITECTURES[self.architecture]
    key = f'{self.architecture}.attention.head_count'
    if permuted and name.endswith(('self_attn.q_proj.weight', 'self_attn.q_proj.bias')):
      return _unpermuted(array, self.metadata[key])
    if permuted and name.endswith(('self_attn.k_proj.weight', 'self_attn.k_proj.bias')):
      return _unpermuted(array, self.metadata.get(f'{key}_kv', self.metadata[key]))
    return array


def checkpoint(path: str) -> Checkpoint:
  """The Checkpoint of a GGUF file, opened once per version of the file: its header holds the
  whole vocabulary, which takes seconds to parse, and a load reads the config, the end token
  and the tensors."""
  try:
    stamp = os.stat(path).st_mtime_ns
  except OSError:
    raise CheckpointError(f'{path} does not exist; pass a .gguf file') from None
  return _opened(path, stamp)


@functools.lru_cache(maxsize=2)
def _opened(path: str, stamp: int) -> Checkpoint:
  del stamp  # Part of the cache key only.
  return Checkpoint(path)


def _architecture(path: str, values: dict) -> str:
  architecture = values.get('general.architecture')
  if architecture not in ARCHITECTURES:
    raise CheckpointError(f'{path}: GGUF architecture {architecture!r} is not supported; '
                          f'supported: {", ".join(ARCHITECTURES)}')
  scaling = values.get(f'{architecture}.rope.scaling.type')
  if scaling not in (None, 'none'):
    raise CheckpointError(f'{path}: rope scaling {scaling!r} is not read from GGUF yet')
  return architecture


def hf_config(path: str) -> dict:
  """The config.json of the Hugging Face model the GGUF file holds."""
  opened = checkpoint(path)
  values, architecture = opened.metadata, opened.architecture

  def value(key, default=None):
    found = values.get(f'{architecture}.{key}', default)
    if found is None:
      raise CheckpointError(f'{path} lacks the metadata {architecture}.{key}')
    return found

  heads = value('attention.head_count')
  embedding = opened.tensors.get('model.embed_tokens.weight')
  if embedding is None:
    raise CheckpointError(f'{path} has no token_embd.weight tensor')
  config = {
      'architectures': [ARCHITECTURES[architecture][0]],
      'vocab_size': int(embedding.shape[-1]),
      'hidden_size': value('embedding_length'),
      'intermediate_size': value('feed_forward_length'),
      'num_hidden_layers': value('block_count'),
      'num_attention_heads': heads,
      'num_key_value_heads': value('attention.head_count_kv', heads),
      'max_position_embeddings': value('context_length'),
      'rms_norm_eps': float(value('attention.layer_norm_rms_epsilon')),
      'rope_theta': float(value('rope.freq_base', 10000.0)),
      'tie_word_embeddings': 'lm_head.weight' not in opened.tensors,
      'bos_token_id': values.get('tokenizer.ggml.bos_token_id'),
      'eos_token_id': values.get('tokenizer.ggml.eos_token_id'),
  }
  head_dim = values.get(f'{architecture}.attention.key_length')
  if head_dim is not None:
    config['head_dim'] = head_dim
  if architecture == 'llama':
    config['attention_bias'] = 'model.layers.0.self_attn.q_proj.bias' in opened.tensors
  return config


# --gguf_type -> (the type of the weight matrices, general.file_type).
FILE_TYPES = {'f32': ('F32', 'ALL_F32'), 'f16': ('F16', 'MOSTLY_F16'),
              'q8_0': ('Q8_0', 'MOSTLY_Q8_0')}
# Hugging Face architectures written as GGUF (Mistral's as llama, as llama.cpp converts it).
WRITTEN = {'LlamaForCausalLM': 'llama', 'MistralForCausalLM': 'llama',
           'Qwen2ForCausalLM': 'qwen2', 'Qwen3ForCausalLM': 'qwen3'}
# The tokenizer metadata keys (data/gguf_tokenizer.py) and the writer's method for each.
TOKENIZER_KEYS = {'tokenizer.ggml.model': 'add_tokenizer_model',
                  'tokenizer.ggml.pre': 'add_tokenizer_pre',
                  'tokenizer.ggml.tokens': 'add_token_list',
                  'tokenizer.ggml.token_type': 'add_token_types',
                  'tokenizer.ggml.merges': 'add_token_merges',
                  'tokenizer.ggml.scores': 'add_token_scores',
                  'tokenizer.ggml.bos_token_id': 'add_bos_token_id',
                  'tokenizer.ggml.eos_token_id': 'add_eos_token_id',
                  'tokenizer.ggml.add_bos_token': 'add_add_bos_token',
                  'tokenizer.chat_template': 'add_chat_template'}
GGUF_NAMES = {**{hf: gg for gg, hf in LAYER_TENSORS.items()},
              **{hf: gg for gg, hf in TOP_TENSORS.items()}}


def _gguf_name(name: str) -> str:
  stem, suffix = name.rsplit('.', 1)
  if stem.startswith('model.layers.'):
    _, _, layer, rest = stem.split('.', 3)
    return f'blk.{layer}.{GGUF_NAMES[rest]}.{suffix}'
  return f'{GGUF_NAMES[stem]}.{suffix}'


def _llama_cpp_order(rows: np.ndarray, n_heads: int) -> np.ndarray:
  """What _unpermuted undoes."""
  shape = rows.shape
  return rows.reshape(n_heads, 2, shape[0] // n_heads // 2, *shape[1:]).swapaxes(1, 2).reshape(
      shape)


def write(hf_config: dict, tensors, path: str, *, file_type: str, tokenizer: dict):
  """Writes the Hugging Face model (config.json `hf_config`, (name, array) `tensors`: hf.py's
  hf_tensors) to the new GGUF file `path`: weight matrices as `file_type` (one whose rows do
  not split into Q8_0's blocks of 32 values in F16), norms and biases in F32 as llama.cpp
  keeps them, and the tokenizer metadata `tokenizer` ({key: value} of TOKENIZER_KEYS)."""
  try:
    import gguf
  except ImportError:
    raise CheckpointError("--gguf_out needs the gguf package: pip install gguf (or "
                          "'lmlab[gguf]')") from None
  hf_name = (hf_config.get('architectures') or ['?'])[0]
  if hf_name not in WRITTEN:
    raise CheckpointError(f'GGUF export writes {", ".join(WRITTEN)}; this model is {hf_name}')
  if hf_config.get('rope_scaling') or (hf_config.get('rope_parameters') or {}).get(
      'rope_type', 'default') != 'default':
    raise CheckpointError('GGUF export does not write rope scaling yet')
  if file_type not in FILE_TYPES:
    raise CheckpointError(f'--gguf_type={file_type!r} is not one of {", ".join(FILE_TYPES)}')
  if os.path.exists(path):
    raise CheckpointError(f'{path} exists; pass a new --gguf_out')
  if not os.path.isdir(os.path.dirname(os.path.abspath(path))):
    raise CheckpointError(f'the folder of --gguf_out={path} does not exist')
  architecture = WRITTEN[hf_name]
  matrix_type = gguf.GGMLQuantizationType[FILE_TYPES[file_type][0]]
  partial = path + '.partial'
  try:
    _write(gguf, hf_config, tensors, partial, architecture, matrix_type, file_type, tokenizer)
  except BaseException as error:  # Nothing half-written is left behind.
    if os.path.exists(partial):
      os.remove(partial)
    if isinstance(error, OSError):
      raise CheckpointError(f'writing {path} failed ({error})') from None
    raise
  os.rename(partial, path)


def _write(gguf, hf_config, tensors, path, architecture, matrix_type, file_type, tokenizer):
  heads, kv_heads = hf_config['num_attention_heads'], hf_config['num_key_value_heads']
  head_dim = hf_config.get('head_dim') or hf_config['hidden_size'] // heads
  writer = gguf.GGUFWriter(path, architecture)
  writer.add_block_count(hf_config['num_hidden_layers'])
  writer.add_context_length(hf_config['max_position_embeddings'])
  writer.add_embedding_length(hf_config['hidden_size'])
  writer.add_feed_forward_length(hf_config['intermediate_size'])
  writer.add_head_count(heads)
  writer.add_head_count_kv(kv_heads)
  writer.add_key_length(head_dim)
  writer.add_value_length(head_dim)
  writer.add_rope_dimension_count(head_dim)
  writer.add_rope_freq_base(float(hf_config.get('rope_theta') or (
      hf_config.get('rope_parameters') or {}).get('rope_theta', 10000.0)))
  writer.add_layer_norm_rms_eps(float(hf_config['rms_norm_eps']))
  writer.add_vocab_size(hf_config['vocab_size'])
  writer.add_file_type(gguf.LlamaFileType[FILE_TYPES[file_type][1]])
  for key, value in tokenizer.items():
    getattr(writer, TOKENIZER_KEYS[key])(value)
  for name, array in tensors:
    array = np.asarray(array, np.float32)
    if architecture == 'llama' and '.q_proj.' in name:
      array = _llama_cpp_order(array, heads)
    elif architecture == 'llama' and '.k_proj.' in name:
      array = _llama_cpp_order(array, kv_heads)
    if array.ndim == 1 or matrix_type == gguf.GGMLQuantizationType.F32:
      writer.add_tensor(_gguf_name(name), array)
    elif matrix_type == gguf.GGMLQuantizationType.F16 or array.shape[-1] % 32:
      writer.add_tensor(_gguf_name(name), array.astype(np.float16))
    else:
      writer.add_tensor(_gguf_name(name), gguf.quants.quantize(array, matrix_type),
                        raw_dtype=matrix_type)
  writer.write_header_to_file()
  writer.write_kv_data_to_file()
  writer.write_tensors_to_file()
  writer.close()
