"""A PEFT model's trained part as a Hugging Face peft folder, whichever its method: LoRA
(models/hf/peft.py), prompt tuning (models/hf/prompt_tuning.py) or prefix tuning
(models/hf/prefix_tuning.py), chosen by the model's config.peft to save and by the folder's
peft_type to load."""
from flax import nnx

from lmlab.models import lora, prefix_tuning, prompt_tuning
from lmlab.models.errors import CheckpointError
from lmlab.models.hf import peft, prefix_tuning as hf_prefix_tuning
from lmlab.models.hf import prompt_tuning as hf_prompt_tuning
from lmlab.models.hf.peft_folders import read_config

SAVERS = {'lora': peft.save_lora, 'prompt': hf_prompt_tuning.save_prompt,
          'prefix': hf_prefix_tuning.save_prefix}
LOADERS = {'LORA': peft.load_lora, 'PROMPT_TUNING': hf_prompt_tuning.load_prompt,
           'PREFIX_TUNING': hf_prefix_tuning.load_prefix}
BASES = {'lora': lora.base_model, 'prompt': prompt_tuning.base_model,
         'prefix': prefix_tuning.base_model}


def save(model, folder: str, *, base_model_name_or_path: str | None = None):
  """Writes the adapter of `model` to a new peft folder for the transformers model that
  hf.save writes of base_model(model)."""
  if model.config.peft not in SAVERS:
    raise CheckpointError(f'this model has peft={model.config.peft!r}, no adapter to save as '
                          f'peft\'s ({", ".join(SAVERS)})')
  SAVERS[model.config.peft](model, folder, base_model_name_or_path=base_model_name_or_path)


def load(model, folder: str):
  """A new model: the plain `model` with the adapter of a peft folder of any method here."""
  adapter, path = read_config(folder)
  if adapter.get('peft_type') not in LOADERS:
    raise CheckpointError(f'{path}: peft_type={adapter.get("peft_type")!r:.60} is not one of '
                          f'{", ".join(LOADERS)}')
  return LOADERS[adapter['peft_type']](model, folder)


def base_model(model):
  """The plain model that the adapter of `model` adapts (`model` itself when plain). A LoRA
  folder holds the model's trainable token rows; a prompt- or prefix-tuning folder has no
  place for them, so for those the base holds them, added into its table."""
  if not model.config.peft:
    return model
  base = BASES[model.config.peft](model)
  if model.token_rows is not None and model.config.peft != 'lora':
    base = nnx.clone(base)  # Its variables are the model's own.
    model.token_rows.fold_into(base)
  return base
