"""Several samples of one prompt over a single copy of the prompt's KV cache: the prefix
sharing of PagedAttention (Kwon et al. 2023), with the sharing made explicit instead of paged.

The prompt runs once, with batch 1, and its keys and values stay one [P, Hkv, D] array per
layer (or int8 codes and scales: models/kv_cache.py). Each of the n samples writes the keys and
values of its own tokens to [n, S, Hkv, D].
A query scores both parts (the prefix without a batch axis, so that no copy is made), and
the two score blocks go through one softmax: the result is attention over the sample's whole
sequence, exactly as with a cache copied n times. Cache memory per layer falls from
n (P + S) to P + n S positions.

Axes: B samples, T this call's tokens, P prompt (prefix) positions, S each sample's own
positions, K KV heads, G query heads per KV head, D head features.
"""
import jax
import jax.numpy as jnp

from lmlab.kernels import masks
from lmlab.models import kv_cache
from lmlab.models.errors import ConfigError


def check_supported(config):
  """Refuses the configurations whose caches are not plain per-position keys and values."""
  if config.attention_type == 'mla':
    raise ConfigError('--num_samples > 1 shares a key/value cache; attention_type=mla caches '
                      'a latent instead: sample one at a time')
  if config.dca_chunk_size:
    raise ConfigError('--num_samples > 1 does not support dual chunk attention '
                      '(dca_chunk_size): sample one at a time')
  if config.peft == 'prefix':
    raise ConfigError('--num_samples > 1 does not support peft=prefix: sample one at a time')


def share(caches, n_samples: int, n_new: int):
  """The per-layer caches of a batch-1 prefill, as shared-prefix caches with room for n_new
  tokens of each of n_samples samples: {'prefix': the prompt's, without the batch axis,
  'own': the samples'}."""
  return [{'prefix': {name: array[0] for name, array in cache.items()},
           'own': {name: jnp.zeros((n_samples, n_new) + array.shape[2:], array.dtype)
                   for name, array in cache.items()}}
          for cache in caches]


def is_shared(cache) -> bool:
  return cache is not None and 'prefix' in cache


def attention(q_bthd, k_btkd, v_btkd, cache, cache_index, *, scale, sliding_window,
              alibi_slopes):
  """Causal attention of queries at positions cache_index.. over the shared prefix and each
  sample's own earlier tokens, after writing k_btkd/v_btkd to the sample's part of the cache.
  Returns (y_bthd, the updated cache)."""
  b, t, hq, d = q_bthd.shape
  prefix_len, n_kv = cache['prefix']['k'].shape[:2]
  cache = dict(cache, own=kv_cache.write(cache['own'], k_btkd, v_btkd, cache_index - prefix_len))
  prefix_k_pkd, prefix_v_pkd = kv_cache.read(cache['prefix'], k_btkd.dtype)
  own_k_bskd, own_v_bskd = kv_cache.read(cache['own'], k_btkd.dtype)
  q_btkgd = q_bthd.reshape(b, t, n_kv, hq // n_kv, d)
  prefix_scores = jnp.einsum('btkgd,pkd->bkgtp', q_btkgd, prefix_k_pkd,
                             preferred_element_type=jnp.float32)
  own_scores = jnp.einsum('btkgd,bskd->bkgts', q_btkgd, own_k_bskd,
                          preferred_element_type=jnp.float32)
  scores_bkgtx = jnp.concatenate([prefix_scores, own_scores], axis=-1) * scale

  q_pos = cache_index + jnp.arange(t)[None, :]
  k_pos = jnp.arange(scores_bkgtx.shape[-1])
  visible_1tx = masks.visible(q_pos, k_pos, causal=True, sliding_window=sliding_window)
  if alibi_slopes is not None:
    bias_1htx = masks.alibi_bias(alibi_slopes, q_pos, k_pos, causal=True)
    scores_bkgtx = scores_bkgtx + bias_1htx.reshape(1, n_kv, hq // n_kv, t, -1)
  scores_bkgtx = jnp.where(visible_1tx[:, None, None], scores_bkgtx, -jnp.inf)
  probs_bkgtx = jax.nn.softmax(scores_bkgtx, axis=-1).astype(own_v_bskd.dtype)
  out_btkgd = (
      jnp.einsum('bkgtp,pkd->btkgd', probs_bkgtx[..., :prefix_len], prefix_v_pkd,
                 preferred_element_type=jnp.float32)
      + jnp.einsum('bkgts,bskd->btkgd', probs_bkgtx[..., prefix_len:], own_v_bskd,
                   preferred_element_type=jnp.float32))
  return out_btkgd.reshape(b, t, hq, d).astype(q_bthd.dtype), cache
