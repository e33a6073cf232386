"""LoRA adapters (models/lora.py) as Hugging Face peft folders, both ways.

  from lmlab.models import hf
  from lmlab.models.hf import peft
  peft.save_lora(model, 'adapter', base_model_name_or_path='Qwen/Qwen2-0.5B')
  adapted = peft.load_lora(hf.load('Qwen2-0.5B'), 'adapter')

A peft LoRA folder holds adapter_config.json (peft_type LORA, r, lora_alpha, target_modules,
...) and adapter_model.safetensors, whose tensors are named after the modules of the
transformers model the adapter is for: base_model.model.<module>.lora_A.weight [U, D_in] and
.lora_B.weight [D_out, U] (U: the rank). The modules are those of the checkpoint hf.save
writes of the base model, found through its architecture's Links; each targeted kernel's Link
must be a plain transpose, and transposes A and B as well.
"""
import dataclasses
import os

import jax
import numpy as np
from flax import nnx

from lmlab.models.config import without_peft
from lmlab.models.errors import CheckpointError, ConfigError
from lmlab.models.hf import architecture_for, safetensors_files
from lmlab.models.hf.architecture import transpose
from lmlab.models.hf.peft_folders import WEIGHTS_FILE, check_type, field, read_config, write
from lmlab.models.lora import TARGET_PATHS
from lmlab.models.registry import abstract_model

PREFIX = 'base_model.model.'  # What peft's PeftModel puts before the module names.
TENSORS = {'lora_a': 'lora_A', 'lora_b': 'lora_B'}  # Our parameter: peft's module.
# adapter_config.json fields of peft features that our LoRA lacks, and their values (or null,
# or no field at all) that leave them off.
FEATURES_OFF = {'use_dora': False, 'bias': 'none', 'lora_bias': False, 'fan_in_fan_out': False,
                'rank_pattern': {}, 'alpha_pattern': {}, 'layers_to_transform': None,
                'layer_replication': None, 'modules_to_save': None, 'exclude_modules': None,
                'target_parameters': None}
TOKEN_ROWS = ('embed', 'embedding'), ('lm_head', 'kernel')  # Whose rows trainable tokens move.
TOKEN_TENSOR = 'token_adapter.trainable_tokens_delta'  # peft's name; it holds the rows.


def _module_name(tensor: str) -> str:
  """'model.layers.0.self_attn.q_proj.weight' -> 'model.layers.0.self_attn.q_proj'."""
  return tensor.rsplit('.', 1)[0]


def _target_links(config, architecture):
  """(the Architecture of config's base, {target: the Link of its kernel in each block} for
  the targets the base has, the names of all its modules)."""
  base = without_peft(config)
  arch = architecture_for(base, architecture)
  links = arch.links(base)
  by_path = {path: link for link in links for path in link.ours}
  by_target = {}
  for name, (sublayer, layer) in TARGET_PATHS.items():
    kernels = [by_path.get(('blocks', i, sublayer, layer, 'kernel')) for i in range(base.n_layers)]
    if None not in kernels:
      by_target[name] = kernels
  return arch, by_target, {_module_name(tensor) for link in links for tensor in link.hf}


def _module(arch, link, target: str) -> str:
  """The transformers module that holds a target's kernel."""
  if len(link.ours) != 1 or link.to_hf is not transpose:
    raise CheckpointError(f'{arch.name} stores the {target!r} layers fused with others or '
                          f'rearranged ({link.hf[0]}); peft cannot adapt them as ours are')
  return _module_name(link.hf[0])


def _matches(module: str, entry: str) -> bool:
  """peft's rule: a target_modules entry names the modules it equals or ends after a dot."""
  return module == entry or module.endswith('.' + entry)


def _peft_names(modules: list, all_modules: set) -> list:
  """target_modules entries that name exactly `modules`: their shortest common dotted suffix
  that names no other module, else each module in full."""
  parts = modules[0].split('.')
  for n in range(1, len(parts) + 1):
    suffix = '.'.join(parts[-n:])
    if {m for m in all_modules if _matches(m, suffix)} == set(modules):
      return [suffix]
  return modules


def save_lora(model, folder: str, *, base_model_name_or_path: str | None = None,
              architecture: str | None = None):
  """Writes the LoRA adapters of `model` (peft=lora) as a peft folder in a new or empty
  directory, for the transformers model that hf.save writes of the base (see hf.save for
  `architecture`); tensors keep the parameters' dtype. base_model_name_or_path (a Hub name or
  a folder) is where peft's tools look for the base."""
  config = model.config
  if config.peft != 'lora':
    raise CheckpointError(f'save_lora writes LoRA adapters; this model has peft={config.peft!r}')
  arch, by_target, all_modules = _target_links(config, architecture)
  params = {path: np.asarray(variable.get_value())
            for path, variable in nnx.to_flat_state(nnx.state(model, nnx.LoRAParam))}
  tensors, target_modules = {}, []
  for name in config.lora_target_names:
    modules = [_module(arch, link, name) for link in by_target[name]]
    for i, (link, module) in enumerate(zip(by_target[name], modules)):
      for ours, theirs in TENSORS.items():
        tensors[f'{PREFIX}{module}.{theirs}.weight'] = link.to_hf(
            [params[('blocks', i, *TARGET_PATHS[name], ours)]])[0]
    target_modules += _peft_names(modules, all_modules)
  write(folder, dict(
      peft_type='LORA', base_model_name_or_path=base_model_name_or_path, r=config.lora_rank,
      lora_alpha=config.lora_alpha, lora_dropout=config.lora_dropout,
      use_rslora=config.lora_rslora, target_modules=sorted(target_modules),
      init_lora_weights=True, **FEATURES_OFF,
      trainable_token_indices=_save_token_rows(model, arch, all_modules, tensors)), tensors)


def _token_row_links(model, arch):
  """{our table's path: its Link} of the embedding and, when untied, the output head."""
  by_path = {path: link for link in arch.links(without_peft(model.config)) for path in link.ours}
  return {path: by_path[path] for path in TOKEN_ROWS if path in by_path}


def _save_token_rows(model, arch, all_modules: set, tensors: dict):
  """Adds the trainable token rows of `model` to `tensors` as peft stores them, the rows
  themselves; returns adapter_config.json's trainable_token_indices (None without rows)."""
  if model.token_rows is None:
    return None
  ids = list(model.token_rows.ids)
  moved = dict(zip(TOKEN_ROWS, model.token_rows.folded(
      model.embed.embedding[...], None if model.lm_head is None else model.lm_head.kernel[...])))
  indices = {}
  for path, link in _token_row_links(model, arch).items():
    module = _module_name(link.hf[0])
    table = link.to_hf([np.asarray(moved[path])])[0]
    tensors[f'{PREFIX}{module}.{TOKEN_TENSOR}'] = np.ascontiguousarray(table[ids])
    [name] = _peft_names([module], all_modules)
    indices[name] = ids
  return indices


def _targets(entries: list, by_target: dict, all_modules: set, path: str) -> list:
  """Our target names for peft's target_modules entries, which must name whole targets."""
  wanted = set()
  for entry in entries:
    matched = {module for module in all_modules if _matches(module, entry)}
    if not matched:
      raise CheckpointError(f'{path}: target_modules entry {entry!r} names no module of the '
                            'base model')
    wanted |= matched
  names, covered = [], set()
  for name, links in by_target.items():
    modules = {_module_name(link.hf[0]) for link in links}
    if wanted & modules and not modules <= wanted:
      raise CheckpointError(f'{path}: target_modules adapt the {name!r} layers of some blocks '
                            'only; our LoRA adapts a target in every block')
    if modules <= wanted:
      names.append(name)
      covered |= modules
  if wanted - covered:
    raise CheckpointError(f'{path}: target_modules name {sorted(wanted - covered)[0]!r}, which '
                          f'is not among the layers LoRA adapts here ({", ".join(by_target)})')
  return names


def _token_indices(adapter, path: str, token_modules: dict) -> dict:
  """{our table's path: token ids} from trainable_token_indices: a list (the embedding's
  rows) or {module name: ids}; token_modules: {our table's path: its transformers module}."""
  indices = adapter.get('trainable_token_indices')
  if indices is None:
    return {}
  if isinstance(indices, list):
    indices = {token_modules[TOKEN_ROWS[0]]: indices}
  if not isinstance(indices, dict):
    raise CheckpointError(f'{path}: trainable_token_indices={indices!r:.60} is not a list of '
                          'token ids or an object of them')
  by_table = {}
  for entry, ids in indices.items():
    tables = [table for table, module in token_modules.items() if _matches(module, entry)]
    if len(tables) != 1:
      raise CheckpointError(f'{path}: trainable_token_indices names {entry!r:.60}, which is not '
                            'one of the modules whose rows train here '
                            f'({", ".join(token_modules.values())})')
    if not (isinstance(ids, list) and ids and all(type(i) is int and i >= 0 for i in ids)):
      raise CheckpointError(f'{path}: trainable_token_indices[{entry!r:.60}]={ids!r:.60} is not a '
                            'list of token ids')
    by_table[tables[0]] = ids
  if len({tuple(ids) for ids in by_table.values()}) > 1:
    raise CheckpointError(f'{path}: trainable_token_indices lists other tokens for the output '
                          'head than for the embedding; ours train the same rows of both')
  return by_table


def _lora_config(adapter, path: str, base, by_target: dict, all_modules: set, token_ids):
  """The ModelConfig of `base` with the LoRA that adapter_config.json describes, whose
  trainable token rows are token_ids."""
  check_type(adapter, path, 'LORA')
  for name, off in FEATURES_OFF.items():
    if adapter.get(name) not in (None, off):
      raise CheckpointError(f'{path}: {name}={adapter[name]!r:.60} is not supported (only '
                            f'{off!r})')
  # Defaults as peft's LoraConfig has them.
  rank = field(adapter, path, 'r', int, 8)
  if rank <= 0:
    raise CheckpointError(f'{path}: r={rank} must be positive')
  entries = field(adapter, path, 'target_modules', list, None)
  if not all(isinstance(entry, str) for entry in entries):
    raise CheckpointError(f'{path}: target_modules={entries!r:.60} is not a list of names')
  targets = _targets(entries, by_target, all_modules, path)
  try:
    return dataclasses.replace(
        base, peft='lora', trainable_tokens=','.join(map(str, token_ids)), lora_rank=rank,
        lora_alpha=float(field(adapter, path, 'lora_alpha', float, 8)),
        lora_dropout=float(field(adapter, path, 'lora_dropout', float, 0.0)),
        lora_targets=','.join(targets),
        lora_rslora=field(adapter, path, 'use_rslora', bool, False)).validate()
  except ConfigError as e:
    raise CheckpointError(f'{path}: {e}') from None


def load_lora(model, folder: str, *, architecture: str | None = None):
  """A new model: `model` (a plain one, such as hf.load gives) with the LoRA adapters of a
  peft folder, whose adapter_config.json sets the LoRA fields of its config. `model` is
  unchanged (the new one shares its arrays); see hf.save for `architecture`."""
  adapter, config_path = read_config(folder, 'peft LoRA')
  weights_path = os.path.join(folder, WEIGHTS_FILE)
  if model.config.peft:
    raise CheckpointError(f'load_lora adds adapters to a plain model, not to one with '
                          f'peft={model.config.peft!r}')
  arch, by_target, all_modules = _target_links(model.config, architecture)
  token_links = _token_row_links(model, arch)
  token_indices = _token_indices(adapter, config_path, {
      table: _module_name(link.hf[0]) for table, link in token_links.items()})
  token_ids = next(iter(token_indices.values()), [])
  config = _lora_config(adapter, config_path, model.config, by_target, all_modules, token_ids)
  checkpoint = safetensors_files.Checkpoint(folder, [WEIGHTS_FILE])
  values = {path: variable.get_value()
            for path, variable in nnx.to_flat_state(nnx.state(model))}
  used = set()
  for table, delta_path in zip(TOKEN_ROWS, (('token_rows', 'embedding_xd'),
                                            ('token_rows', 'head_xd'))):
    if not token_ids or table not in token_links:
      continue
    link, ours = token_links[table], values[table]
    rows = link.to_hf([np.asarray(ours)])[0][token_ids]
    if table in token_indices:
      tensor = f'{PREFIX}{_module_name(link.hf[0])}.{TOKEN_TENSOR}'
      if tensor not in checkpoint:
        raise CheckpointError(f'{weights_path} has no tensor {tensor!r}, which '
                              'trainable_token_indices asks for')
      stored = checkpoint.read(tensor)
      if stored.shape != rows.shape:
        raise CheckpointError(f'{weights_path}: tensor {tensor!r} has shape {stored.shape}, not '
                              f'{rows.shape} (the tokens listed, the base model\'s width)')
      rows = np.asarray(stored, dtype=rows.dtype) - rows
      used.add(tensor)
    else:
      rows = np.zeros_like(rows)  # peft left these rows as they are.
    values[delta_path] = jax.device_put(rows)
  for name in config.lora_target_names:
    for i, link in enumerate(by_target[name]):
      module = _module(arch, link, name)
      ours = ('blocks', i, *TARGET_PATHS[name])
      kernel = values[ours + ('kernel',)]
      (d_in, d_out), rank = kernel.shape, config.lora_rank
      for key, shape in (('lora_a', (d_in, rank)), ('lora_b', (rank, d_out))):
        tensor = f'{PREFIX}{module}.{TENSORS[key]}.weight'
        if tensor not in checkpoint:
          raise CheckpointError(f'{weights_path} has no tensor {tensor!r}, which '
                                'target_modules asks for')
        stored = checkpoint.read(tensor)
        if stored.shape != shape[::-1]:  # The Link transposes.
          raise CheckpointError(f'{weights_path}: tensor {tensor!r} has shape {stored.shape}, '
                                f'not {shape[::-1]}: r={rank} on {d_in} -> {d_out} features of '
                                'the base model\'s layer; is the adapter for another base?')
        array = link.to_ours([stored])[0]
        values[ours + (key,)] = jax.device_put(np.asarray(array, dtype=kernel.dtype))
        used.add(tensor)
  unused = sorted(checkpoint.names() - used)
  if unused:
    raise CheckpointError(f'{weights_path} holds {len(unused)} tensors that target_modules does '
                          f'not account for, e.g. {unused[0]!r}')
  graphdef, abstract = nnx.split(abstract_model(config))
  return nnx.merge(graphdef, nnx.from_flat_state(
      [(path, variable.replace(values[path])) for path, variable in nnx.to_flat_state(abstract)]))
