"""The plain attention: materialises the scores. The oracle for every other implementation."""
import jax
import jax.numpy as jnp

from lmlab.kernels import masks


def attention(q_bthd, k_bskd, v_bskd, *, causal, sliding_window, segment_ids,
              prefix_len, alibi_slopes, scale, q_offset):
  b, t, hq, d = q_bthd.shape
  s, hkv = k_bskd.shape[1], k_bskd.shape[2]
  groups = hq // hkv
  # Query heads of one group share a KV head; KV is indexed, never repeated.
  q_btkgd = q_bthd.reshape(b, t, hkv, groups, d)
  scores_bkgts = jnp.einsum('btkgd,bskd->bkgts', q_btkgd, k_bskd,
                            preferred_element_type=jnp.float32) * scale

  q_pos = jnp.asarray(q_offset).reshape(-1, 1) + jnp.arange(t)[None, :]
  k_pos = jnp.arange(s)
  q_segment, kv_segment = segment_ids if segment_ids is not None else (None, None)
  visible_bts = masks.visible(q_pos, k_pos, causal=causal, sliding_window=sliding_window,
                              prefix_len=prefix_len, q_segment=q_segment,
                              kv_segment=kv_segment)
  if alibi_slopes is not None:
    bias_bhts = masks.alibi_bias(alibi_slopes, q_pos, k_pos, causal=causal)
    scores_bkgts = scores_bkgts + bias_bhts.reshape(bias_bhts.shape[0], hkv, groups, t, s)

  visible_b11ts = visible_bts[:, None, None]
  scores_bkgts = jnp.where(visible_b11ts, scores_bkgts, -jnp.inf)
  row_max = jnp.max(scores_bkgts, axis=-1, keepdims=True)
  row_max = jax.lax.stop_gradient(jnp.where(jnp.isfinite(row_max), row_max, 0.0))
  weights = jnp.exp(scores_bkgts - row_max)
  denom = jnp.sum(weights, axis=-1, keepdims=True)
  # A row with no visible key has denom 0; it returns zeros.
  probs_bkgts = weights / jnp.where(denom == 0.0, 1.0, denom)
  out_btkgd = jnp.einsum('bkgts,bskd->btkgd', probs_bkgts.astype(v_bskd.dtype), v_bskd,
                         preferred_element_type=jnp.float32)
  return out_btkgd.reshape(b, t, hq, d).astype(q_bthd.dtype)
