"""Prompt tuning (Lester et al. 2021): P trained embeddings of virtual tokens before every row.

A prompt-tuned decoder reads [prompt, row]: the P virtual tokens at positions 0..P-1, then
the row's tokens at P + their own positions, so every token sees the whole prompt and the
prompt sees nothing of the row (the causal mask). The logits are the row's only, [B, T, V].
The embeddings [P, D] are a PromptParam, the only parameters a prompt-tuning run trains.
This is what Hugging Face peft's PROMPT_TUNING computes on a transformers causal LM, whose
logits come with the virtual tokens' first ([B, P + T, V]).

With attention_mask (padding), positions count the row's real tokens, so a row's logits do
not depend on its padding. peft places a row's tokens after its padding whatever the mask
(positions 0..P+T-1), so with left padding its logits differ from the unpadded row's while
ours do not; right-padded rows agree.

Packed rows (segment_ids_bt) and prefix-LM rows (prefix_len_b) are refused: attention's
mask description lets a key be seen by one segment only, so one prompt cannot lead every
document of a packed row.

A KV cache (DecoderLM.init_cache) starts with the prompt's keys and values in its first P
slots, and decode's cache_index counts the row's tokens after them.
"""
import jax
import jax.numpy as jnp
from flax import nnx

from lmlab.models import sharding
from lmlab.models.config import without_peft
from lmlab.models.errors import ConfigError
from lmlab.models.sharding import EMBED


class PromptParam(nnx.Param):
  """The virtual tokens' embeddings, the parameters a peft=prompt run trains."""


class Prompt(nnx.Module):

  def __init__(self, embedding_yd):
    self.embedding = sharding.param(embedding_yd, (None, EMBED), kind=PromptParam)

  def embeddings(self, batch: int, dtype):
    """The prompt of every row, [B, P, D] in `dtype`."""
    return jnp.broadcast_to(self.embedding[...].astype(dtype), (batch, *self.embedding.shape))

  def prepend(self, x_btd, positions_bt, segment_ids_bt):
    """(the prompt's embeddings before x_btd, positions 0..P-1 before positions_bt + P, and
    the segment ids with the prompt in segment 1 (attention_mask's real tokens), or None)."""
    b = x_btd.shape[0]
    p = self.embedding.shape[0]
    prompt_byd = self.embeddings(b, x_btd.dtype)
    positions_by = jnp.broadcast_to(jnp.arange(p, dtype=positions_bt.dtype), (b, p))
    if segment_ids_bt is not None:
      segment_ids_bt = jnp.concatenate(
          [jnp.ones((b, p), segment_ids_bt.dtype), segment_ids_bt], axis=1)
    return (jnp.concatenate([prompt_byd, x_btd], axis=1),
            jnp.concatenate([positions_by, positions_bt + p], axis=1), segment_ids_bt)


def add_prompt(model, config, *, rngs: nnx.Rngs, embedding_yd=None):
  """`model` with config.prompt_tokens virtual tokens, embedding_yd [P, D] or drawn as
  config.prompt_init says, and `config` as its config; changed in place and returned. model
  is a decoder built from config (models/registry.build calls this) or from its base,
  without_peft(config)."""
  if config.peft != 'prompt':
    raise ConfigError(f'add_prompt needs a config with peft=prompt, not peft={config.peft!r}')
  if model.config not in (config, without_peft(config)):
    raise ConfigError('add_prompt: the config describes another model than the one given '
                      '(they must differ in the peft fields only)')
  table_vd = model.embed.embedding[...]
  shape = (config.prompt_tokens, config.d_model)
  if embedding_yd is None and config.prompt_init == 'vocab':
    embedding_yd = table_vd[jax.random.randint(rngs.params(), shape[:1], 0, config.vocab_size)]
  elif embedding_yd is None:
    embedding_yd = config.init_std * jax.random.normal(rngs.params(), shape, table_vd.dtype)
  model.prompt = Prompt(embedding_yd)
  model.config = config
  return model


def base_model(model):
  """The plain model that model's prompt leads: model's other parameters, shared."""
  graphdef, state = nnx.split(model)
  plain = nnx.merge(graphdef, state)
  plain.prompt = plain.token_rows = None
  plain.config = without_peft(model.config)
  return plain
