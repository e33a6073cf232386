"""KV cache size per token of any config, as in table 1 of the DeepSeek-V2 paper.

With l layers, n_g KV heads of d_h features, a K/V latent of d_c and a RoPE key of d_h^R:
    MHA 2 n_h d_h l,   GQA 2 n_g d_h l,   MQA 2 d_h l,   MLA (d_c + d_h^R) l   elements.
MHA, GQA and MQA are one formula here, through n_kv_heads. An int8 cache
(kv_cache_dtype='int8', models/kv_cache.py) takes d_h + 4 bytes per key or value of a head.
"""
import jax.numpy as jnp


def kv_cache_elements_per_token(config) -> int:
  """Elements the decode cache holds per token, over all layers."""
  if config.attention_type == 'mla':
    per_layer = config.kv_lora_rank + config.qk_rope_head_dim
  else:
    per_layer = 2 * config.n_kv_heads * config.resolved_head_dim
  return per_layer * config.n_layers


def kv_cache_bytes_per_token(config, dtype=None) -> int:
  """Bytes per token of a cache stored in `dtype` (default: the compute dtype, which
  DecoderLM.init_cache uses), or of int8 codes and float32 scales."""
  if config.kv_cache_dtype == 'int8':
    return 2 * config.n_kv_heads * (config.resolved_head_dim + 4) * config.n_layers
  return kv_cache_elements_per_token(config) * jnp.dtype(dtype or config.dtype).itemsize
