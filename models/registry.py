"""The module class a ModelConfig builds, chosen by its `family`, with its parameter-efficient
fine-tuning method's parameters, and which of them train."""
import dataclasses

import jax
from flax import nnx

from lmlab.models import pruning, weight_quant
from lmlab.models.bert import Bert
from lmlab.models.config import ModelConfig
from lmlab.models.decoder import DecoderLM
from lmlab.models.adapter import AdapterParam, add_adapters
from lmlab.models.llama_adapter import AdaptionPromptParam, add_llama_adapter
from lmlab.models.lora import add_lora, float_config
from lmlab.models.moe import unchosen_expert_params
from lmlab.models.prefix_tuning import PrefixParam, add_prefix
from lmlab.models.prompt_tuning import PromptParam, add_prompt
from lmlab.models.seq2seq import EncoderDecoder
from lmlab.models.trainable_tokens import TokenRowsParam, add_trainable_tokens

FAMILY_CLASSES = {'decoder': DecoderLM, 'encoder': Bert, 'encoder_decoder': EncoderDecoder}
# Each PEFT method: the function that adds its parameters to a built model, and their type.
PEFT_METHODS = {'lora': (add_lora, nnx.LoRAParam), 'adapter': (add_adapters, AdapterParam),
                'llama_adapter': (add_llama_adapter, AdaptionPromptParam),
                'prompt': (add_prompt, PromptParam), 'prefix': (add_prefix, PrefixParam)}


def model_class(config: ModelConfig):
  return FAMILY_CLASSES[config.family]


def build(config: ModelConfig, *, rngs: nnx.Rngs):
  model = model_class(config)(config, rngs=rngs)
  if config.pruned:
    pruning.add_masks(model)
  if config.qat:
    weight_quant.add_fake_quant(model, weight_quant.parse_spec(config.qat, 'qat'))
  if config.quantize:
    weight_quant.quantize_kernels(model, weight_quant.parse_spec(config.quantize, 'quantize'))
  if not config.peft:
    return model
  add, _ = PEFT_METHODS[config.peft]
  model = add(model, config, rngs=rngs)
  return add_trainable_tokens(model, config) if config.trainable_tokens else model


def trainable(config: ModelConfig):
  """The nnx filter of the parameters a run of `config` trains: its PEFT method's (a LoRA
  run's adapters, a prompt-tuning run's virtual tokens) with its trainable token rows and a
  decoder's score or value head (new to the model, as peft's modules_to_save); else None for
  all of them, or nnx.Param for a pruned model, whose masks do not train."""
  if not config.peft:
    return nnx.Param if config.pruned else None
  filters = [PEFT_METHODS[config.peft][1]]
  if config.trainable_tokens:
    filters.append(TokenRowsParam)
  if config.n_labels:
    filters.append(nnx.PathContains('score'))
  if config.value_head:
    filters.append(nnx.PathContains('value_head'))
  return filters[0] if len(filters) == 1 else nnx.Any(*filters)


def abstract_model(config: ModelConfig):
  """The model of `config` with shapes and dtypes for arrays: nothing is allocated."""
  return nnx.eval_shape(lambda: build(config, rngs=nnx.Rngs(0)))


def param_count(config: ModelConfig) -> int:
  """Number of parameters, from shapes alone; a quantised kernel counts as the values it
  stands for."""
  return sum(leaf.size for leaf in jax.tree.leaves(
      nnx.state(abstract_model(dataclasses.replace(float_config(config), quantize='')),
                nnx.Param)))


def active_param_count(config: ModelConfig) -> int:
  """Parameters each token is computed with: param_count less the experts a mixture of
  experts does not choose for it (param_count itself for a dense model)."""
  return param_count(config) - unchosen_expert_params(config)


def without_value_head(model):
  """The language model of a model with a value head (PPO's policy without its critic), or
  `model` itself when it has none."""
  if not getattr(model.config, 'value_head', False):
    return model
  graphdef, abstract = nnx.split(abstract_model(dataclasses.replace(model.config,
                                                                    value_head=False)))
  values = dict(nnx.to_flat_state(nnx.state(model)))
  return nnx.merge(graphdef, nnx.from_flat_state(
      [(path, values[path]) for path, _ in nnx.to_flat_state(abstract)]))
