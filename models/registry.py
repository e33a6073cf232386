"""The module class a ModelConfig builds, chosen by its `family`, with its parameter-efficient
fine-tuning method's parameters, and which of them train."""
import jax
from flax import nnx

from lmlab.models.bert import Bert
from lmlab.models.config import ModelConfig
from lmlab.models.decoder import DecoderLM
from lmlab.models.lora import add_lora
from lmlab.models.prompt_tuning import PromptParam, add_prompt
from lmlab.models.seq2seq import EncoderDecoder

FAMILY_CLASSES = {'decoder': DecoderLM, 'encoder': Bert, 'encoder_decoder': EncoderDecoder}


def model_class(config: ModelConfig):
  return FAMILY_CLASSES[config.family]


def build(config: ModelConfig, *, rngs: nnx.Rngs):
  model = model_class(config)(config, rngs=rngs)
  add_peft = {'lora': add_lora, 'prompt': add_prompt}.get(config.peft)
  return add_peft(model, config, rngs=rngs) if add_peft else model


def trainable(config: ModelConfig):
  """The nnx filter of the parameters a run of `config` trains: its PEFT method's (a LoRA
  run's adapters, a prompt-tuning run's virtual tokens), or None for all of them."""
  return {'lora': nnx.LoRAParam, 'prompt': PromptParam}.get(config.peft)


def abstract_model(config: ModelConfig):
  """The model of `config` with shapes and dtypes for arrays: nothing is allocated."""
  return nnx.eval_shape(lambda: build(config, rngs=nnx.Rngs(0)))


def param_count(config: ModelConfig) -> int:
  """Number of parameters, from shapes alone."""
  return sum(leaf.size for leaf in jax.tree.leaves(nnx.state(abstract_model(config), nnx.Param)))
