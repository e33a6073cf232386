"""Trainable token rows: some tokens' embeddings train beside a PEFT method's parameters.

A chat template's special tokens are often new to a pre-trained model: their rows of the
embedding (and of the output head) were drawn at random and never trained, and under a PEFT
method the whole table is frozen, so the model could neither read nor write them well.
config.trainable_tokens lists the token ids whose rows train (Hugging Face peft's
trainable_token_indices). Each listed row gets a delta [X, D] (TokenRowsParam) that starts at
zero, so a model starts out computing what its base does: the input embedding of token ids[i]
is its row plus delta[i], and so is its output row when the head is tied to the embedding;
an untied head has a delta of its own. The table itself stays frozen, and a merge adds the
deltas into it. peft stores the rows themselves (row + delta) for each of embed_tokens and,
when untied, lm_head; models/hf/peft.py converts.
"""
import jax.numpy as jnp
from flax import nnx

from lmlab.models import sharding
from lmlab.models.sharding import EMBED


class TokenRowsParam(nnx.Param):
  """The delta of a trainable token row: what a run trains besides its PEFT method's."""


class TrainableTokens(nnx.Module):

  def __init__(self, ids, d_model: int, *, tied: bool, param_dtype):
    self.ids = tuple(ids)
    zeros = lambda: sharding.param(jnp.zeros((len(self.ids), d_model), param_dtype),
                                   (None, EMBED), kind=TokenRowsParam)
    self.embedding_xd = zeros()
    self.head_xd = None if tied else nnx.data(zeros())

  def embed(self, tokens_bt, x_btd):
    """x_btd, the embeddings of tokens_bt, with the listed tokens' deltas added."""
    match_btx = (tokens_bt[..., None] == jnp.asarray(self.ids)).astype(x_btd.dtype)
    return x_btd + match_btx @ self.embedding_xd[...].astype(x_btd.dtype)

  def head(self, w_dv):
    """The output weight w_dv [D, V] with the listed tokens' columns moved by their deltas."""
    delta_xd = (self.embedding_xd if self.head_xd is None else self.head_xd)[...]
    return w_dv.at[:, jnp.asarray(self.ids)].add(delta_xd.T.astype(w_dv.dtype))

  def folded(self, table_vd, head_dv=None):
    """(the embedding table with the deltas added to its rows, and head_dv [D, V] with its own
    (or, tied, None))."""
    ids = jnp.asarray(self.ids)
    table_vd = table_vd.at[ids].add(self.embedding_xd[...].astype(table_vd.dtype))
    return table_vd, None if head_dv is None else self.head(head_dv)

  def fold_into(self, plain):
    """Sets the table (and untied head) of `plain`, a model without token rows whose table and
    head are those these deltas move, to the moved ones."""
    table_vd, head_dv = self.folded(plain.embed.embedding[...],
                                    None if plain.lm_head is None else plain.lm_head.kernel[...])
    plain.embed.embedding.set_value(table_vd)
    if head_dv is not None:
      plain.lm_head.kernel.set_value(head_dv)


def add_trainable_tokens(model, config):
  """`model` (a decoder of config, with its PEFT method's parameters) with zero deltas for
  config.trainable_tokens; changed in place and returned."""
  model.token_rows = nnx.data(TrainableTokens(
      config.trainable_token_ids, config.d_model, tied=model.lm_head is None,
      param_dtype=jnp.dtype(config.param_dtype)))
  return model
