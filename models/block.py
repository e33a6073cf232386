"""One transformer block and the norm-placement policies that wrap its sublayers.

A sublayer F (attention or MLP) joins the residual stream x as
    x <- sum_norm(alpha * x + out_norm(F(in_norm(x))))
and each placement switches some of those norms on:
    pre       in_norm                 (Xiong et al. 2020; final norm after the stack)
    post      sum_norm                (Vaswani et al. 2017)
    sandwich  in_norm and out_norm    (Ding et al. 2021, CogView; final norm)
    deepnorm  sum_norm, alpha=(2N)^(1/4), branch init scaled by beta=(8N)^(-1/4)
              (Wang et al. 2022, DeepNet, decoder-only constants)
With parallel_block, attention and MLP read the same normed input and are summed.
Under peft=adapter, F's output passes through its Houlsby adapter first (models/adapter.py).
A block with cross_attention (the encoder-decoder's decoder) has a third sublayer between
the two, under the same placement: attention to the encoder's memory.
"""
import dataclasses

import jax
from flax import nnx

from lmlab.models import kv_cache
from lmlab.models.attention import SelfAttention
from lmlab.models.cross_attention import CrossAttention
from lmlab.models.mla import LatentAttention, empty_latent_cache
from lmlab.models.mlp import MLP
from lmlab.models.moe import MoE
from lmlab.models.normalization import make_norm
from lmlab.models.stack import split_keys


@dataclasses.dataclass(frozen=True)
class Placement:
  in_norm: bool
  out_norm: bool
  sum_norm: bool
  final_norm: bool


PLACEMENTS = {
    'pre': Placement(in_norm=True, out_norm=False, sum_norm=False, final_norm=True),
    'post': Placement(in_norm=False, out_norm=False, sum_norm=True, final_norm=False),
    'sandwich': Placement(in_norm=True, out_norm=True, sum_norm=False, final_norm=True),
    'deepnorm': Placement(in_norm=False, out_norm=False, sum_norm=True, final_norm=False),
}


# Each attention_type: its module and the function that builds one layer's empty cache.
ATTENTIONS = {'mha': (SelfAttention, kv_cache.empty),
              'mla': (LatentAttention, empty_latent_cache)}


def deepnorm_constants(n_layers: int):
  """(alpha, beta) of DeepNet for a decoder-only stack of n_layers."""
  return (2.0 * n_layers) ** 0.25, (8.0 * n_layers) ** -0.25


def identity(x):
  return x


def sublayer_key(branch_key):
  """The key of the dropout inside a sublayer (LoRA's adapters), folded from its branch's
  key, so that the branch's own dropout mask stays that of a model without adapters."""
  return None if branch_key is None else jax.random.fold_in(branch_key, 1)


class Block(nnx.Module):

  def __init__(self, config, *, dtype, param_dtype, rngs, cross_attention=False, layer=0):
    """layer: the block's index in its stack, which decides whether its MLP is a mixture of
    experts (ModelConfig.is_moe_layer)."""
    placement = PLACEMENTS[config.norm_placement]
    alpha, beta = (deepnorm_constants(config.n_layers) if config.norm_placement == 'deepnorm'
                   else (1.0, 1.0))
    self.residual_scale = alpha
    self.parallel = config.parallel_block

    def norm_if(wanted):
      if not wanted:
        return identity
      return make_norm(config.norm, config.d_model, eps=config.norm_eps, dtype=dtype,
                       param_dtype=param_dtype)

    attention_class, _ = ATTENTIONS[config.attention_type]
    self.attention = attention_class(config, out_init_scale=beta, dtype=dtype,
                                     param_dtype=param_dtype, rngs=rngs)
    self.cross_attention = (CrossAttention(config, out_init_scale=beta, dtype=dtype,
                                           param_dtype=param_dtype, rngs=rngs)
                            if cross_attention else None)
    mlp_class = MoE if config.is_moe_layer(layer) else MLP
    self.mlp = mlp_class(config, init_scale=beta, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    self.attn_in_norm = norm_if(placement.in_norm)
    self.attn_out_norm = norm_if(placement.out_norm)
    self.attn_sum_norm = norm_if(placement.sum_norm)
    self.cross_in_norm = norm_if(cross_attention and placement.in_norm)
    self.cross_out_norm = norm_if(cross_attention and placement.out_norm)
    self.cross_sum_norm = norm_if(cross_attention and placement.sum_norm)
    self.mlp_in_norm = norm_if(placement.in_norm and not self.parallel)
    self.mlp_out_norm = norm_if(placement.out_norm)
    self.mlp_sum_norm = norm_if(placement.sum_norm and not self.parallel)
    # Each sublayer's Houlsby adapter (models/adapter.py) under peft=adapter.
    self.attn_adapter = self.mlp_adapter = identity
    self.dropout = nnx.Dropout(config.dropout_rate)

  def __call__(self, x_btd, rotate, *, cache=None, cache_index=None, dropout_key=None,
               memory=None, **mask):
    """Returns (x_btd, the attention layer's updated cache or None).

    `mask` holds the attention's mask arguments (alibi_slopes, segment_ids_bt, prefix_len_b;
    positions_bt too with dual chunk attention).
    `memory` is the cross-attention's (CrossAttention.memory) in a block that has one.
    Dropout is on when a dropout_key is given (training) and off otherwise.
    """
    keys = split_keys(dropout_key, 2 if self.cross_attention is None else 3)
    attn_key, mlp_key = keys[0], keys[-1]

    def branch_output(y_btd, adapter, out_norm, key):
      return self.dropout(out_norm(adapter(y_btd)), deterministic=key is None, rngs=key)

    h_btd = self.attn_in_norm(x_btd)
    attn_btd, cache = self.attention(h_btd, rotate, cache=cache, cache_index=cache_index,
                                     dropout_key=sublayer_key(attn_key), **mask)
    attn_btd = branch_output(attn_btd, self.attn_adapter, self.attn_out_norm, attn_key)
    mlp = lambda h_btd: self.mlp(h_btd, dropout_key=sublayer_key(mlp_key))
    if self.parallel:
      mlp_btd = branch_output(mlp(h_btd), self.mlp_adapter, self.mlp_out_norm, mlp_key)
      return self.attn_sum_norm(self.residual_scale * x_btd + attn_btd + mlp_btd), cache
    x_btd = self.attn_sum_norm(self.residual_scale * x_btd + attn_btd)
    if self.cross_attention is not None:
      cross_btd = self.cross_attention(self.cross_in_norm(x_btd), memory)
      x_btd = self.cross_sum_norm(self.residual_scale * x_btd
                                  + branch_output(cross_btd, identity, self.cross_out_norm,
                                                keys[1]))
    mlp_btd = branch_output(mlp(self.mlp_in_norm(x_btd)), self.mlp_adapter,
                            self.mlp_out_norm, mlp_key)
    return self.mlp_sum_norm(self.residual_scale * x_btd + mlp_btd), cache
