"""Multi-head latent attention (MLA) of DeepSeek-V2 (DeepSeek-AI 2024, section 2.1).

Keys and values of every head come up from one shared latent per token,
    c_kv = RMSNorm(x W^DKV)             [d_c = kv_lora_rank]
    k_nope_h = c_kv W^UK_h,  v_h = c_kv W^UV_h,
and positions enter through a decoupled RoPE part: a key k_rope = RoPE(x W^KR) shared by all
heads and a per-head query part q_rope_h. The score of head h is
    q_nope_h . k_nope_h + q_rope_h . k_rope.
Queries are projected directly, or through their own low-rank latent (q_lora_rank > 0).

Parameter names are those of Hugging Face's DeepseekV2 checkpoints (kv_a_proj_with_mqa holds
W^DKV and W^KR side by side; kv_b_proj holds W^UK and W^UV, per head, side by side).

Training and uncached calls expand K and V per head and run the ordinary attention. The cache
keeps only c_kv and the rotated k_rope of each position; cached calls use the absorbed form:
    q_nope_h . (c_kv W^UK_h) = (q_nope_h W^UK_h^T) . c_kv,   sum_s p_s c_kv_s W^UV_h,
an attention of every query head over one shared "key head" [c_kv, k_rope], whose first d_c
features are also the value. The cache is never expanded per head.
"""
import math

import jax
import jax.numpy as jnp
from flax import nnx

from lmlab.models import sharding
from lmlab.models.dense import Dense
from lmlab.models.normalization import RMSNorm
from lmlab.models.sharding import EMBED, HEADS

# DeepSeek-V2 normalises both latents with this epsilon, whatever the model's norm_eps.
LATENT_NORM_EPS = 1e-6


def empty_latent_cache(config, batch: int, length: int, dtype):
  """One layer's cache: the K/V latent and the rotated RoPE key of `length` positions."""
  return {'c_kv': jnp.zeros((batch, length, config.kv_lora_rank), dtype),
          'k_rope': jnp.zeros((batch, length, config.qk_rope_head_dim), dtype)}


def latent_softmax_scale(config) -> float:
  """The config's softmax scale, times DeepSeek-V2's YaRN correction mscale(factor)^2 with
  mscale = 0.1 * mscale_all_dim * ln(factor) + 1, which its attention applies to the whole
  score (rope and non-rope parts) when rope scaling sets mscale_all_dim."""
  scaling = config.rope_scaling_dict if config.position == 'rope' else None
  if not scaling or scaling.get('rope_type', scaling.get('type', 'default')) == 'default':
    return config.softmax_scale
  factor, weight = scaling.get('factor') or 1.0, scaling.get('mscale_all_dim') or 0.0
  if factor <= 1.0 or not weight:
    return config.softmax_scale
  return config.softmax_scale * (0.1 * weight * math.log(factor) + 1.0) ** 2


def _pad_last(x, dim: int):
  return jnp.pad(x, [(0, 0)] * (x.ndim - 1) + [(0, dim - x.shape[-1])])


class LatentAttention(nnx.Module):

  def __init__(self, config, *, out_init_scale: float, dtype, param_dtype, rngs):
    self.n_heads = config.n_heads
    self.kv_lora_rank, self.rope_dim = config.kv_lora_rank, config.qk_rope_head_dim
    self.nope_dim, self.v_dim = config.qk_nope_head_dim, config.v_head_dim
    self.scale, self.impl = latent_softmax_scale(config), config.attention_impl
    self.sliding_window = config.sliding_window or None
    self.dtype = dtype
    qk_dim = config.qk_head_dim

    # Latent dimensions (the LoRA ranks) are small and stay whole on every device.
    def linear(d_in, d_out, axes, use_bias, init_scale=1.0):
      return Dense(d_in, d_out, axes=axes, use_bias=use_bias,
                   init_std=config.init_std * init_scale, dtype=dtype, param_dtype=param_dtype,
                   rngs=rngs)

    def latent_norm(dim):
      return RMSNorm(dim, eps=LATENT_NORM_EPS, dtype=dtype, param_dtype=param_dtype)

    # qkv_bias gives biases to the projections that read x, as attention_bias does in
    # Hugging Face's DeepseekV2 (its q_proj, q_b_proj and kv_b_proj have none).
    if config.q_lora_rank:
      self.q_proj = None
      self.q_a_proj = linear(config.d_model, config.q_lora_rank, (EMBED, None), config.qkv_bias)
      self.q_a_layernorm = latent_norm(config.q_lora_rank)
      self.q_b_proj = linear(config.q_lora_rank, self.n_heads * qk_dim, (None, HEADS), False)
    else:
      self.q_proj = linear(config.d_model, self.n_heads * qk_dim, (EMBED, HEADS), False)
      self.q_a_proj = self.q_a_layernorm = self.q_b_proj = None
    self.kv_a_proj_with_mqa = linear(config.d_model, self.kv_lora_rank + self.rope_dim,
                                     (EMBED, None), config.qkv_bias)
    self.kv_a_layernorm = latent_norm(self.kv_lora_rank)
    self.kv_b_proj = linear(self.kv_lora_rank, self.n_heads * (self.nope_dim + self.v_dim),
                            (None, HEADS), False)
    self.o_proj = linear(self.n_heads * self.v_dim, config.d_model, (HEADS, EMBED),
                         config.use_bias, out_init_scale)
    if out_init_scale != 1.0:
      # DeepNet scales the value projection's init as well as the output's; here W^UV is the
      # value half of each head's columns of kv_b_proj.
      w_chd = self.kv_b_proj.kernel[...].reshape(self.kv_lora_rank, self.n_heads, -1)
      w_chd = w_chd.at[..., self.nope_dim:].multiply(out_init_scale)
      self.kv_b_proj.kernel[...] = w_chd.reshape(self.kv_lora_rank, -1)

  def _queries(self, x_btd):
    if self.q_proj is not None:
      return self.q_proj(x_btd)
    return self.q_b_proj(self.q_a_layernorm(self.q_a_proj(x_btd)))

  def __call__(self, x_btd, rotate, *, alibi_slopes=None, segment_ids_bt=None, prefix_len_b=None,
               cache=None, cache_index=None, dropout_key=None):
    """Causal MLA with SelfAttention's interface: `rotate` rotates the RoPE parts (last dim
    qk_rope_head_dim), alibi_slopes [H], segment_ids_bt and prefix_len_b describe the mask.

    Without a cache, attends within x over per-head keys and values. With a cache (from
    `empty_latent_cache`), writes this call's latents at cache_index and attends over the whole
    cache in the absorbed form; the causal mask with q_offset=cache_index hides the slots not
    yet written. Returns (y_btd, updated cache or None). dropout_key, SelfAttention's key of
    its adapters' dropout, is unused: LoRA (models/lora.py) does not cover MLA yet.
    """
    b, t, _ = x_btd.shape
    q_bthd = self._queries(x_btd).reshape(b, t, self.n_heads, self.nope_dim + self.rope_dim)
    q_nope_bthn, q_rope_bthr = q_bthd[..., :self.nope_dim], rotate(q_bthd[..., self.nope_dim:])
    kv_a_bta = self.kv_a_proj_with_mqa(x_btd)
    c_kv_btc = self.kv_a_layernorm(kv_a_bta[..., :self.kv_lora_rank])
    k_rope_btr = rotate(kv_a_bta[:, :, None, self.kv_lora_rank:])[:, :, 0]

    mask = dict(causal=True, sliding_window=self.sliding_window, prefix_len=prefix_len_b,
                segment_ids=None if segment_ids_bt is None else (segment_ids_bt, segment_ids_bt),
                alibi_slopes=alibi_slopes, scale=self.scale, impl=self.impl)
    if cache is None:
      y_bthd = self._expanded(q_nope_bthn, q_rope_bthr, c_kv_btc, k_rope_btr, mask)
    else:
      start = (0, cache_index, 0)
      cache = {
          'c_kv': jax.lax.dynamic_update_slice(cache['c_kv'],
                                               c_kv_btc.astype(cache['c_kv'].dtype), start),
          'k_rope': jax.lax.dynamic_update_slice(cache['k_rope'],
                                                 k_rope_btr.astype(cache['k_rope'].dtype), start)}
      y_bthd = self._absorbed(q_nope_bthn, q_rope_bthr, cache['c_kv'], cache['k_rope'],
                              dict(mask, q_offset=cache_index))
    return self.o_proj(y_bthd.reshape(b, t, self.n_heads * self.v_dim)), cache

  def _expanded(self, q_nope_bthn, q_rope_bthr, c_kv_bsc, k_rope_bsr, mask):
    """Attention over per-head keys [k_nope_h, k_rope] and values v_h."""
    b, s, _ = c_kv_bsc.shape
    kv_bshd = self.kv_b_proj(c_kv_bsc).reshape(b, s, self.n_heads, self.nope_dim + self.v_dim)
    k_rope_bshr = jnp.broadcast_to(k_rope_bsr[:, :, None, :], (b, s, self.n_heads, self.rope_dim))
    q_bthd = jnp.concatenate([q_nope_bthn, q_rope_bthr], axis=-1)
    k_bshd = jnp.concatenate([kv_bshd[..., :self.nope_dim], k_rope_bshr], axis=-1)
    v_bshd = kv_bshd[..., self.nope_dim:]
    # kernels.attention takes one head_dim for q, k and v. Zero features change neither the
    # scores (the scale is explicit) nor the output's first v_head_dim features.
    width = max(q_bthd.shape[-1], self.v_dim)
    y_bthd = sharding.attention(_pad_last(q_bthd, width), _pad_last(k_bshd, width),
                               _pad_last(v_bshd, width), **mask)
    return y_bthd[..., :self.v_dim]

  def _absorbed(self, q_nope_bthn, q_rope_bthr, c_kv_bsc, k_rope_bsr, mask):
    """MQA over the latents: W^UK folded into the queries, W^UV applied after attention."""
    kernel = self.kv_b_proj.kernel[...].astype(self.dtype)
    w_chd = kernel.reshape(self.kv_lora_rank, self.n_heads, -1)
    w_uk_chn, w_uv_chd = w_chd[..., :self.nope_dim], w_chd[..., self.nope_dim:]
    q_latent_bthc = jnp.einsum('bthn,chn->bthc', q_nope_bthn, w_uk_chn)
    q_btha = jnp.concatenate([q_latent_bthc, q_rope_bthr.astype(q_latent_bthc.dtype)], axis=-1)
    # One key head [c_kv, k_rope]; passing it as the value too gives sum_s p_s c_kv_s in the
    # output's first kv_lora_rank features (the rest, the same sum of k_rope, is dropped).
    kv_bs1a = jnp.concatenate([c_kv_bsc, k_rope_bsr], axis=-1)[:, :, None, :].astype(q_btha.dtype)
    o_btha = sharding.attention(q_btha, kv_bs1a, kv_bs1a, **mask)
    return jnp.einsum('bthc,chd->bthd', o_btha[..., :self.kv_lora_rank], w_uv_chd)
