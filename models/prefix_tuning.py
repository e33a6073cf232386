"""Prefix tuning (Li & Liang 2021): trained keys and values before every layer's own.

Each layer's attention holds O prefix vectors (prefix_tokens) as keys and values per KV head,
[O, Hkv, D] each, that every query attends to in one softmax with the row's tokens: the
kernel sees O extra keys in front of the row's and takes the queries to sit at positions
O.. (q_offset), so the causal mask shows each query every prefix key and the row's keys up
to its own. The prefix keys are learned as they are used, after any position encoding (a
fixed rotation of a free vector is another free vector), and the row keeps positions 0..T-1:
a prefixed model reads its tokens at the positions its base does.

With prefix_projection = F > 0, the vectors come through the reparameterisation of the
paper: an embedding [O, D] and an MLP D -> F (tanh) -> 2 Hkv D per layer, which the paper
found to train more stably than the vectors themselves. Li & Liang and peft share one MLP
among all layers (its output holds every layer's vectors); here each layer has its own, so
that a layer's prefix lives in its attention like the rest of its parameters.

Padding (attention_mask) makes the real tokens segment 1, and the prefix joins that segment.
Packed rows (segment_ids_bt) and prefix-LM rows (prefix_len_b) are refused: attention's mask
description lets a key be seen by one segment only. A sliding window would hide the prefix
from distant queries, so it is refused too (models/config.py). The KV cache holds the row's
tokens only; each call puts the prefix in front of it.
The embedding and the vectors start standard normal, as peft's nn.Embedding does.
"""
import jax
import jax.numpy as jnp
from flax import nnx

from lmlab.models import sharding
from lmlab.models.config import check_adds, without_peft
from lmlab.models.sharding import EMBED, KV_HEADS


class PrefixParam(nnx.Param):
  """A prefix vector, embedding or reparameterisation weight: what a peft=prefix run trains."""


class Prefix(nnx.Module):

  def __init__(self, config, *, rngs: nnx.Rngs):
    param_dtype = jnp.dtype(config.param_dtype)
    o, kv, d = config.prefix_tokens, config.n_kv_heads, config.resolved_head_dim
    self.shape_okd = (o, kv, d)
    f = config.prefix_projection
    self.projected = f > 0
    def param(shape, axes, std=1.0):
      return sharding.param(std * jax.random.normal(rngs.params(), shape, param_dtype), axes,
                            kind=PrefixParam)

    def zeros(shape, axes):
      return sharding.param(jnp.zeros(shape, param_dtype), axes, kind=PrefixParam)

    if f:
      self.embedding_od = param((o, config.d_model), (None, EMBED))
      self.w_in_dx = param((config.d_model, f), (EMBED, None), config.init_std)
      self.b_in_x = zeros((f,), (None,))
      self.w_out_xx = param((f, 2 * kv * d), (None, None), config.init_std)
      self.b_out_x = zeros((2 * kv * d,), (None,))
    else:
      self.k_okd = param(self.shape_okd, (None, KV_HEADS, None))
      self.v_okd = param(self.shape_okd, (None, KV_HEADS, None))

  def keys_values(self):
    """The prefix's keys and values, [O, Hkv, D] each."""
    if not self.projected:
      return self.k_okd[...], self.v_okd[...]
    hidden_ox = jnp.tanh(self.embedding_od[...] @ self.w_in_dx[...] + self.b_in_x[...])
    kv_ox = hidden_ox @ self.w_out_xx[...] + self.b_out_x[...]
    k_okd, v_okd = jnp.split(kv_ox, 2, axis=-1)
    return k_okd.reshape(self.shape_okd), v_okd.reshape(self.shape_okd)

  def prepend(self, k_bskd, v_bskd, segment_ids):
    """(the prefix's keys before k_bskd, its values before v_bskd, the segment ids (q, kv)
    with the prefix in segment 1, or None), in k's and v's dtypes."""
    b, o = k_bskd.shape[0], self.shape_okd[0]
    k_okd, v_okd = self.keys_values()

    def before(prefix_okd, x_bskd):
      prefix_bokd = jnp.broadcast_to(prefix_okd.astype(x_bskd.dtype), (b, *self.shape_okd))
      return jnp.concatenate([prefix_bokd, x_bskd], axis=1)

    if segment_ids is not None:
      q_segment_bt, kv_segment_bs = segment_ids
      segment_ids = (q_segment_bt, jnp.concatenate(
          [jnp.ones((b, o), kv_segment_bs.dtype), kv_segment_bs], axis=1))
    return before(k_okd, k_bskd), before(v_okd, v_bskd), segment_ids


def add_prefix(model, config, *, rngs: nnx.Rngs):
  """`model` with a Prefix in every layer's attention and `config` as its config; changed in
  place and returned. model is a decoder built from config (models/registry.build calls
  this) or from its base, without_peft(config)."""
  check_adds('prefix', config, model.config, 'add_prefix')
  for block in model.blocks:
    # nnx.data: the attribute held None, which nnx takes for static.
    block.attention.prefix = nnx.data(Prefix(config, rngs=rngs))
  model.config = config
  return model


def base_model(model):
  """The plain model that model's prefixes lead: model's other parameters, shared."""
  plain = nnx.merge(*nnx.split(model))
  for block in plain.blocks:
    block.attention.prefix = None
  plain.token_rows = None
  plain.config = without_peft(model.config)
  return plain
