"""A run's workdir: config.json (the resolved config), metrics.jsonl, tokens/, checkpoints/.

config.json is written when a run starts and never rewritten; a later run in the same
workdir must describe the same model, tokenizer and data, or it is refused.
"""
import json
import os

from lmlab.models import config as model_config_lib

CONFIG_FILE = 'config.json'
# What a checkpoint means depends on these; the training schedule may change on resume.
MUST_MATCH = ('model', 'tokenizer', 'tokenizer_pattern', 'data', 'val_fraction')
# Model fields that change how a step runs, not what a checkpoint holds.
MAY_CHANGE = ('remat', 'attention_impl')


class WorkdirError(RuntimeError):
  """A workdir that does not fit the requested run."""


def config_path(workdir: str) -> str:
  return os.path.join(workdir, CONFIG_FILE)


def read_config(workdir: str) -> dict:
  path = config_path(workdir)
  if not os.path.exists(path):
    raise WorkdirError(f'{path} not found: --workdir must be the folder of a training run')
  try:
    with open(path, encoding='utf-8') as f:
      resolved = json.load(f)
  except (ValueError, RecursionError) as e:
    raise WorkdirError(f'{path} is not UTF-8 JSON ({e})') from None
  if not isinstance(resolved, dict) or 'model' not in resolved:
    raise WorkdirError(f'{path} is not a run config: expected a JSON object with a "model" '
                       'object of ModelConfig fields')
  try:
    resolved['model'] = model_config_lib.from_dict(resolved['model']).validate()
  except model_config_lib.ConfigError as e:
    raise WorkdirError(f'{path}: "model" is not a valid model config ({e})') from None
  return resolved


def _differences(old: dict, new: dict):
  for key in MUST_MATCH:
    before, after = old.get(key), new.get(key)
    if isinstance(before, dict) and isinstance(after, dict):
      for field in sorted(set(before) | set(after)):
        if key == 'model' and field in MAY_CHANGE:
          continue
        if before.get(field) != after.get(field):
          yield f'{key}.{field}: {before.get(field)!r} -> {after.get(field)!r}'
    elif before != after:
      yield f'{key}: {before!r} -> {after!r}'


def record_config(workdir: str, resolved: dict):
  """Writes config.json for a new run, or checks that a resumed run matches it."""
  resolved = {**resolved, 'model': model_config_lib.to_dict(resolved['model'])}
  path = config_path(workdir)
  if os.path.exists(path):
    with open(path) as f:
      try:
        previous = json.load(f)
      except ValueError:
        raise WorkdirError(f'{path} is not valid JSON; use a new --workdir') from None
    try:  # Written by an earlier version: compare in today's form.
      previous['model'] = model_config_lib.to_dict(model_config_lib.from_dict(previous['model']))
    except (KeyError, TypeError, model_config_lib.ConfigError) as e:
      raise WorkdirError(f'{path} is not a valid run config ({e}); use a new --workdir') from None
    changed = list(_differences(previous, resolved))
    if changed:
      raise WorkdirError(f'{workdir} holds a run with a different config ({"; ".join(changed)});'
                         ' use the same flags to resume it, or a new --workdir')
    return
  os.makedirs(workdir, exist_ok=True)
  with open(path + '.partial', 'w') as f:
    json.dump(resolved, f, indent=2)
  os.replace(path + '.partial', path)
