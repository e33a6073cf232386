"""The mask description shared by every attention implementation.

A mask is never passed around as a [T, S] tensor. Implementations receive the
description (causal, sliding window, prefix length, segment ids, ALiBi slopes,
query offset) and evaluate it on whatever block of (query, key) positions they
are working on. Semantics are those of docs/DESIGN.md: query row i sits at absolute
position p = q_offset + i, key column j at position j.
"""
import jax.numpy as jnp


def visible(q_pos, k_pos, *, causal=False, sliding_window=None, prefix_len=None,
            q_segment=None, kv_segment=None):
  """Which keys each query may attend to.

  Args:
    q_pos: [B, T] or [T] absolute query positions.
    k_pos: [S] key positions.
    causal: keys at positions <= the query's are visible.
    sliding_window: w; additionally q_pos - w < k_pos.
    prefix_len: [B] ints; queries inside the prefix see every prefix key.
    q_segment, kv_segment: [B, T] / [B, S] ids; keys must share the query's id.

  Returns:
    bool [B or 1, T, S].
  """
  q_pos = jnp.asarray(q_pos)
  if q_pos.ndim == 1:
    q_pos = q_pos[None]
  q = q_pos[:, :, None]
  k = jnp.asarray(k_pos)[None, None, :]
  ok = jnp.ones(jnp.broadcast_shapes(q.shape, k.shape), bool)
  if causal:
    ok = k <= q
  if prefix_len is not None:
    prefix = jnp.asarray(prefix_len)[:, None, None]
    ok = ok | ((q < prefix) & (k < prefix))
  if sliding_window is not None:
    ok = ok & (q - sliding_window < k)
  if q_segment is not None:
    ok = ok & (q_segment[:, :, None] == kv_segment[:, None, :])
  return ok


def alibi_bias(slopes_h, q_pos, k_pos, *, causal):
  """ALiBi's additive bias -slope_h * distance, float32 [B or 1, H, T, S]."""
  q_pos = jnp.asarray(q_pos)
  if q_pos.ndim == 1:
    q_pos = q_pos[None]
  distance = (q_pos[:, None, :, None] - jnp.asarray(k_pos)[None, None, None, :])
  distance = distance.astype(jnp.float32)
  if not causal:
    distance = jnp.abs(distance)
  return -jnp.asarray(slopes_h, jnp.float32)[None, :, None, None] * distance
