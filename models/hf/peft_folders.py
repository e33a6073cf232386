"""What every Hugging Face peft adapter folder holds, whatever its method:
adapter_config.json (peft_type, task_type and the method's fields) beside
adapter_model.safetensors. The methods' own files (models/hf/peft.py: LoRA,
models/hf/prompt_tuning.py: prompt tuning) write and read their fields through these."""
import json
import os

from lmlab.models.errors import CheckpointError
from lmlab.models.hf import safetensors_files
from lmlab.models.json_values import is_finite_number, read_json

CONFIG_FILE = 'adapter_config.json'
WEIGHTS_FILE = 'adapter_model.safetensors'
PROMPT_TENSOR = 'prompt_embeddings'  # Prompt and prefix tuning's one tensor.
TYPE_NAMES = {int: 'an integer', float: 'a number', bool: 'true or false',
              list: 'a list of module names'}


def check_new(folder: str):
  """Raises unless `folder` can be written: it does not exist or is an empty directory."""
  if os.path.exists(folder) and (not os.path.isdir(folder) or os.listdir(folder)):
    raise CheckpointError(f'{folder} exists and is not an empty directory; choose a new path')


def write(folder: str, adapter_config: dict, tensors: dict):
  """Writes a causal-LM adapter folder (check_new first: nothing is written on a bad path)."""
  check_new(folder)
  os.makedirs(folder, exist_ok=True)
  safetensors_files.write(os.path.join(folder, WEIGHTS_FILE), tensors)
  with open(os.path.join(folder, CONFIG_FILE), 'x') as f:
    json.dump({**adapter_config, 'task_type': 'CAUSAL_LM', 'inference_mode': True}, f, indent=2)


def read_config(folder: str, method: str = 'peft') -> tuple[dict, str]:
  """(adapter_config.json of a folder that holds both files, its path); `method` names the
  folder wanted in the error of a missing file."""
  config_path = os.path.join(folder, CONFIG_FILE)
  for path in (config_path, os.path.join(folder, WEIGHTS_FILE)):
    if not os.path.isfile(path):
      raise CheckpointError(f'{folder} has no {os.path.basename(path)}; pass a {method} folder')
  adapter = read_json(config_path, CheckpointError)
  if not isinstance(adapter, dict):
    raise CheckpointError(f'{config_path} holds {type(adapter).__name__}, not a JSON object')
  if adapter.get('task_type') not in (None, 'CAUSAL_LM'):
    raise CheckpointError(f'{config_path}: task_type={adapter["task_type"]!r:.60} is not '
                          'CAUSAL_LM')
  return adapter, config_path


def check_type(adapter: dict, path: str, peft_type: str):
  if adapter.get('peft_type') != peft_type:
    raise CheckpointError(f'{path}: peft_type={adapter.get("peft_type")!r:.60} is not '
                          f'{peft_type}, the peft method read here')


def field(adapter: dict, path: str, name: str, kind: type, default):
  """adapter[name] (default when absent), which must be of `kind`."""
  value = adapter.get(name, default)
  if not (is_finite_number(value) if kind is float else type(value) is kind):
    raise CheckpointError(f'{path}: {name}={value!r:.60} is not {TYPE_NAMES[kind]}')
  return value


def check_one_stack(adapter: dict, path: str):
  """Raises unless a prompt-learning folder (prompt or prefix tuning) is for one stack of
  layers, as a causal LM has (an encoder-decoder has two)."""
  if adapter.get('num_transformer_submodules') not in (None, 1):
    raise CheckpointError(f'{path}: num_transformer_submodules='
                          f'{adapter["num_transformer_submodules"]!r:.60} is not 1, a causal '
                          'LM\'s one stack')


def read_prompt_embeddings(folder: str, shape: tuple, axes: str):
  """The one tensor of a prompt-learning folder (prompt or prefix tuning), prompt_embeddings,
  which must be there alone and of `shape` (axes: what its axes are, for the error)."""
  weights_path = os.path.join(folder, WEIGHTS_FILE)
  checkpoint = safetensors_files.Checkpoint(folder, [WEIGHTS_FILE])
  if checkpoint.names() != {PROMPT_TENSOR}:
    raise CheckpointError(f'{weights_path} holds {sorted(checkpoint.names())!r:.80}, not the one '
                          f'tensor {PROMPT_TENSOR!r}')
  stored = checkpoint.read(PROMPT_TENSOR)
  if stored.shape != shape:
    raise CheckpointError(f'{weights_path}: {PROMPT_TENSOR} has shape {stored.shape}, not '
                          f'{shape} ({axes})')
  return stored
