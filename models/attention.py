"""Multi-head self-attention with grouped KV heads (MHA, GQA, MQA) and a KV cache.

projections -> optional q/k norm -> positions (RoPE) -> kernels.attention -> output projection.
K and V keep their n_kv_heads heads everywhere, the cache included.
"""
import jax.numpy as jnp
from flax import nnx

from lmlab.models import kv_cache, shared_prefix, sharding
from lmlab.models.errors import ConfigError
from lmlab.models.dca import dual_chunk_attention
from lmlab.models.dense import Dense
from lmlab.models.normalization import RMSNorm
from lmlab.models.positions import RotaryPositions
from lmlab.models.sharding import BATCH, EMBED, HEADS, KV_HEADS, LENGTH, constrain
from lmlab.models.stack import split_keys


class SelfAttention(nnx.Module):

  def __init__(self, config, *, out_init_scale: float, dtype, param_dtype, rngs):
    head_dim = config.resolved_head_dim
    self.n_heads, self.n_kv_heads, self.head_dim = config.n_heads, config.n_kv_heads, head_dim
    self.scale, self.impl = config.softmax_scale, config.attention_impl
    self.causal = config.causal
    self.sliding_window = config.sliding_window or None
    # Dual Chunk Attention rotates q and k itself, at positions it derives from the tokens'.
    self.dca_rope = RotaryPositions(config) if config.dca_chunk_size else None
    self.dca_chunk_size, self.dca_local_size = config.dca_chunk_size, config.dca_local_size

    def linear(d_in, d_out, axes, use_bias, init_scale=1.0):
      return Dense(d_in, d_out, axes=axes, use_bias=use_bias,
                   init_std=config.init_std * init_scale, dtype=dtype, param_dtype=param_dtype,
                   rngs=rngs)

    self.q_proj = linear(config.d_model, config.n_heads * head_dim, (EMBED, HEADS),
                         config.qkv_bias)
    self.k_proj = linear(config.d_model, config.n_kv_heads * head_dim, (EMBED, KV_HEADS),
                         config.qkv_bias)
    self.v_proj = linear(config.d_model, config.n_kv_heads * head_dim, (EMBED, KV_HEADS),
                         config.qkv_bias, out_init_scale)
    self.o_proj = linear(config.n_heads * head_dim, config.d_model, (HEADS, EMBED),
                         config.use_bias, out_init_scale)
    if config.qk_norm:
      self.q_norm = RMSNorm(head_dim, eps=config.norm_eps, dtype=dtype, param_dtype=param_dtype)
      self.k_norm = RMSNorm(head_dim, eps=config.norm_eps, dtype=dtype, param_dtype=param_dtype)
    else:
      self.q_norm = self.k_norm = None
    self.adaption = None  # Its AdaptionPrompt under peft=llama_adapter (models/llama_adapter.py).
    self.prefix = None  # Its Prefix under peft=prefix (models/prefix_tuning.py).

  def __call__(self, x_btd, rotate, *, alibi_slopes=None, segment_ids_bt=None,
               prefix_len_b=None, cache=None, cache_index=None, positions_bt=None,
               dropout_key=None):
    """Causal self-attention (both ways with config.causal=False); `rotate(x_bthd)` applies
    the position encoding to q and k, and alibi_slopes [H], when given, a distance bias that
    the kernel computes from positions.

    With segment_ids_bt (packed documents, or padding), a token sees only earlier tokens of
    its segment; with prefix_len_b [B] (prefix-LM), the first prefix_len tokens see each
    other both ways. config.sliding_window limits each token to the last w positions.

    Without a cache, attends within x. With a cache (from `kv_cache.empty`), writes this
    call's keys/values at cache_index and attends over the whole cache; the causal mask
    with q_offset=cache_index hides the slots not yet written. A shared-prefix cache
    (models/shared_prefix.py) holds the prompt once for every row of the batch.

    With config.dca_chunk_size, the attention is Dual Chunk Attention (models/dca.py) of the
    tokens at positions_bt (default cache_index or 0 onwards), the cache at slots 0..S-1;
    `rotate` is unused then and the cache holds keys before RoPE.
    Under peft=prefix, the layer's trained keys and values come before the row's or the
    cache's (models/prefix_tuning.py).
    Dropout inside the projections (LoRA's adapters) is on when a dropout_key is given.
    Returns (y_btd, updated cache or None).
    """
    b, t, _ = x_btd.shape
    q_key, k_key, v_key, o_key = split_keys(dropout_key, 4)
    q_bthd = self.q_proj(x_btd, dropout_key=q_key).reshape(b, t, self.n_heads, self.head_dim)
    q_bthd = constrain(q_bthd, (BATCH, LENGTH, HEADS, None))
    if self.q_norm is not None:
      q_bthd = self.q_norm(q_bthd)
    k_btkd, v_btkd = self.keys_values(x_btd, k_key, v_key)
    if self.dca_rope is None:
      q_bthd, k_btkd = rotate(q_bthd), rotate(k_btkd)

    if shared_prefix.is_shared(cache):
      y_bthd, cache = shared_prefix.attention(q_bthd, k_btkd, v_btkd, cache, cache_index,
                                              scale=self.scale,
                                              sliding_window=self.sliding_window,
                                              alibi_slopes=alibi_slopes)
    else:
      y_bthd, cache = self._attend(q_bthd, k_btkd, v_btkd, alibi_slopes=alibi_slopes,
                                   segment_ids_bt=segment_ids_bt, prefix_len_b=prefix_len_b,
                                   cache=cache, cache_index=cache_index,
                                   positions_bt=positions_bt)
    if self.adaption is not None:
      y_bthd = y_bthd + self.adaption(q_bthd, self.keys_values)
    y_bthd = constrain(y_bthd, (BATCH, LENGTH, HEADS, None))
    return self.o_proj(y_bthd.reshape(b, t, self.n_heads * self.head_dim),
                       dropout_key=o_key), cache

  def _attend(self, q_bthd, k_btkd, v_btkd, *, alibi_slopes, segment_ids_bt, prefix_len_b,
              cache, cache_index, positions_bt):
    """Attention over this call's keys, or over the cache after writing them to it;
    returns (y_bthd, the updated cache or None)."""
    k_bskd, v_bskd, q_offset = k_btkd, v_btkd, 0
    if cache is not None:
      cache = kv_cache.write(cache, k_btkd, v_btkd, cache_index)
      (k_bskd, v_bskd), q_offset = kv_cache.read(cache, k_btkd.dtype), cache_index

    segment_ids = None if segment_ids_bt is None else (segment_ids_bt, segment_ids_bt)
    if self.prefix is not None:
      k_bskd, v_bskd, segment_ids = self.prefix.prepend(k_bskd, v_bskd, segment_ids)
      q_offset = q_offset + self.prefix.shape_okd[0]
    if self.dca_rope is not None:
      y_bthd = self._dual_chunk(q_bthd, k_bskd, v_bskd, positions_bt, q_offset,
                                segment_ids=segment_ids, prefix_len_b=prefix_len_b,
                                cached=cache is not None)
    else:
      y_bthd = sharding.attention(q_bthd, k_bskd, v_bskd, causal=self.causal, scale=self.scale,
                                 sliding_window=self.sliding_window, segment_ids=segment_ids,
                                 prefix_len=prefix_len_b, alibi_slopes=alibi_slopes,
                                 q_offset=q_offset, impl=self.impl)
    return y_bthd, cache

  def keys_values(self, x_btd, k_key=None, v_key=None):
    """The keys (k_norm'd with qk_norm, before positions) and values of x_btd, each
    [B, T, Hkv, D]; k_key and v_key are their projections' dropout keys."""
    b, t, _ = x_btd.shape
    k_btkd = self.k_proj(x_btd, dropout_key=k_key).reshape(b, t, self.n_kv_heads, self.head_dim)
    v_btkd = self.v_proj(x_btd, dropout_key=v_key).reshape(b, t, self.n_kv_heads, self.head_dim)
    k_btkd = constrain(k_btkd, (BATCH, LENGTH, KV_HEADS, None))
    v_btkd = constrain(v_btkd, (BATCH, LENGTH, KV_HEADS, None))
    return (k_btkd if self.k_norm is None else self.k_norm(k_btkd)), v_btkd

  def _dual_chunk(self, q_bthd, k_bskd, v_bskd, positions_bt, q_offset, *, segment_ids,
                  prefix_len_b, cached):
    if prefix_len_b is not None:
      raise ConfigError('dual chunk attention is causal only; it takes no prefix_len '
                        '(prefix-LM)')
    b, t = q_bthd.shape[:2]
    if positions_bt is None:
      positions_bt = jnp.broadcast_to(q_offset + jnp.arange(t), (b, t))
    # A cache slot's index is its key's position; uncached keys are this call's tokens.
    k_positions = jnp.arange(k_bskd.shape[1]) if cached else positions_bt
    return dual_chunk_attention(
        q_bthd, k_bskd, v_bskd, rotation_at=self.dca_rope.rotation,
        chunk_size=self.dca_chunk_size, local_size=self.dca_local_size, scale=self.scale,
        q_positions_bt=positions_bt, k_positions_bs=k_positions, segment_ids=segment_ids)
