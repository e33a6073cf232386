"""Dual Chunk Attention (DCA): RoPE attention beyond the trained length, without training.

Source: C. An, F. Huang, J. Zhang, S. Gong, X. Qiu, C. Zhou, L. Kong, "Training-Free
Long-Context Scaling of Large Language Models", ICML 2024, arXiv:2402.17463, section 3
(code: github.com/HKUNLP/ChunkLlama). Qwen2/Qwen2.5 ship it as `dual_chunk_attention_config`
{chunk_size, local_size}; the parameterisation below is theirs, as vLLM implements it
(DualChunkRotaryEmbedding and the dual-chunk flash-attention backend).

Definition. With chunk_size c and local_size w (0 <= 2w < c), the sequence is cut into
chunks of s = c - w tokens; the token at position p lies in chunk n(p) = p // s. RoPE never
sees p itself. Every key j is rotated at P_k = j mod s. A query i is rotated at one of
three positions, chosen by the chunk of the key it is scored against:

  intra-chunk       n(j) = n(i), j <= i   P_q = i mod s                 (distance i - j)
  successive-chunk  n(j) = n(i) - 1       P_q = min(s + (i mod s), c)
  inter-chunk       n(j) <= n(i) - 2      P_q = c

so every relative distance P_q - P_k stays within [0, c]. Within its own chunk a query sees
true distances; the first w + 1 queries of a chunk also see the previous chunk at true
distances (the local window: s + (i mod s) - (j mod s) = i - j there), and later queries
see it as if they sat at position c; every older key is seen from position c. Intra-chunk
attention covers the keys of the query's chunk up to itself, successive-chunk attention
the whole previous chunk, inter-chunk attention everything before that. Each of the three
is a softmax attention over its own keys returning (output, log-sum-exp); they are merged
by their log-sum-exps, which makes the result one softmax over all keys j <= i of the
scores q_i(P_q) . k_j(P_k) * scale. A part without keys for a row contributes nothing.

The paper writes the same scheme with the pretraining length c_paper: P_q^Inter = c_paper - 1
and P_q^Succ = [s, s+1, ..., s+w_paper-1, c_paper-1, ...] with w_paper = c_paper - s; that
is the scheme above with c_paper = chunk_size + 1 (as in the authors' own code, where the
largest query position is chunk_size). Requiring 2w < c (a chunk longer than the window)
keeps P_q^Inter = c equal to vLLM's, and makes DCA equal plain RoPE attention for every
input of at most c tokens: at most two chunks, and no successive-chunk query reaches the
clamp. Qwen's `original_max_position_embeddings` (vLLM scales the softmax by
max(1, 0.1 ln(length / original) + 1)) is not part of DCA and is not applied here.

Positions, not indices, define chunks and causality (key visible when its position is at
most the query's and, with segment ids, when the segments agree), so packed documents with
positions restarting at 0, left padding, and a KV cache (keys at slots 0..S-1) all work.
Inference only. Memory is O(block_q * S) per head: queries are processed a block at a time,
each block against every key with the three masks.
"""
import jax
import jax.numpy as jnp
import numpy as np


def _rotate_together(rotation_at, pieces):
  """Rotates each (x [B, N, H, D], positions [B, N]) of `pieces` with a single rotation_at call.

  Heads are folded into the sequence axis so that all pieces share one positions array: a
  rope scaling that reads the largest position in play (dynamic NTK, LongRoPE) then picks
  the same frequencies for the keys and for every query part.
  """
  flat = [x.reshape(x.shape[0], -1, 1, x.shape[-1]) for x, _ in pieces]
  positions = jnp.concatenate([jnp.repeat(p, x.shape[2], axis=1) for x, p in pieces], axis=1)
  rotated = rotation_at(positions)(jnp.concatenate(flat, axis=1))
  bounds = np.cumsum([f.shape[1] for f in flat])[:-1]
  return [r.reshape(x.shape) for r, (x, _) in zip(jnp.split(rotated, bounds, axis=1), pieces)]


def _partial_attention(q_btkgd, k_bskd, v_bskd, visible_bts, scale):
  """Softmax attention over the visible keys: (output [B,T,Hkv,G,D] f32, lse [B,T,Hkv,G]).

  A row without visible keys has output 0 and log-sum-exp -inf.
  """
  scores_bkgts = jnp.einsum('btkgd,bskd->bkgts', q_btkgd, k_bskd,
                            preferred_element_type=jnp.float32) * scale
  scores_bkgts = jnp.where(visible_bts[:, None, None], scores_bkgts, -jnp.inf)
  row_max = jnp.max(scores_bkgts, axis=-1, keepdims=True)
  row_max = jnp.where(jnp.isfinite(row_max), row_max, 0.0)
  weights_bkgts = jnp.exp(scores_bkgts - row_max)
  denom_bkgt1 = jnp.sum(weights_bkgts, axis=-1, keepdims=True)
  probs_bkgts = weights_bkgts / jnp.where(denom_bkgt1 == 0.0, 1.0, denom_bkgt1)
  out_btkgd = jnp.einsum('bkgts,bskd->btkgd', probs_bkgts.astype(v_bskd.dtype), v_bskd,
                         preferred_element_type=jnp.float32)
  lse_bkgt = (jnp.log(denom_bkgt1) + row_max)[..., 0]
  return out_btkgd, jnp.moveaxis(lse_bkgt, -1, 1)


def _merge(outs, lses):
  """Combines partial attentions over disjoint key sets by their log-sum-exps."""
  lse_pbtkg = jnp.stack(lses)
  top = jnp.max(lse_pbtkg, axis=0)
  top = jnp.where(jnp.isfinite(top), top, 0.0)
  weights_pbtkg = jnp.exp(lse_pbtkg - top)
  total_btkg = jnp.sum(weights_pbtkg, axis=0)
  out_btkgd = jnp.sum(weights_pbtkg[..., None] * jnp.stack(outs), axis=0)
  return out_btkgd / jnp.where(total_btkg == 0.0, 1.0, total_btkg)[..., None]


def _blocks(x, block: int):
  """[B, T, ...] -> [T/block, B, block, ...], T padded with zeros to a multiple of block."""
  pad = -x.shape[1] % block
  x = jnp.pad(x, [(0, 0), (0, pad)] + [(0, 0)] * (x.ndim - 2))
  return jnp.moveaxis(x.reshape(x.shape[0], -1, block, *x.shape[2:]), 1, 0)


def dual_chunk_attention(q_bthd, k_bskd, v_bskd, *, rotation_at, chunk_size: int,
                         local_size: int, scale: float, q_positions_bt=None, k_positions_bs=None,
                         segment_ids=None, block_q: int = 256):
  """Causal Dual Chunk Attention of queries and keys given before RoPE (see the module doc).

  Args:
    q_bthd: queries [B, T, Hq, D]; k_bskd, v_bskd: keys and values [B, S, Hkv, D] with
      Hq % Hkv == 0 (each group of Hq / Hkv query heads reads one K/V head).
    rotation_at: positions [B, N] -> a function that applies RoPE at those positions to
      [B, N, H, D] tensors (`RotaryPositions.rotation`).
    chunk_size, local_size: c and w of the module doc, 0 <= 2 * local_size < chunk_size.
    scale: softmax scale.
    q_positions_bt, k_positions_bs: int positions, default 0..T-1 and 0..S-1.
    segment_ids: (q_segment [B, T], kv_segment [B, S]) or None.
    block_q: queries per step.
  Returns:
    [B, T, Hq, D] in q's dtype; a query with no visible key gets zeros.
  """
  b, t, hq, d = q_bthd.shape
  s, hkv = k_bskd.shape[1], k_bskd.shape[2]
  if not 0 <= 2 * local_size < chunk_size:
    raise ValueError(f'dual_chunk_attention: need 0 <= 2 * local_size < chunk_size, got '
                     f'local_size={local_size}, chunk_size={chunk_size}')
  chunk_len = chunk_size - local_size
  q_pos_bt = (jnp.broadcast_to(jnp.arange(t), (b, t)) if q_positions_bt is None
              else jnp.broadcast_to(q_positions_bt, (b, t)))
  k_pos_bs = (jnp.broadcast_to(jnp.arange(s), (b, s)) if k_positions_bs is None
              else jnp.broadcast_to(k_positions_bs, (b, s)))
  in_chunk_bt = q_pos_bt % chunk_len
  k_rot_bskd, q_intra_bthd, q_succ_bthd, q_inter_bthd = _rotate_together(rotation_at, [
      (k_bskd, k_pos_bs % chunk_len),
      (q_bthd, in_chunk_bt),
      (q_bthd, jnp.minimum(in_chunk_bt + chunk_len, chunk_size)),
      (q_bthd, jnp.full_like(in_chunk_bt, chunk_size))])
  k_chunk_bs = k_pos_bs // chunk_len
  q_segment_bt, kv_segment_bs = (segment_ids if segment_ids is not None
                                 else (jnp.zeros((b, t), jnp.int32), jnp.zeros((b, s), jnp.int32)))

  def attend(block):
    q_parts, q_pos_bq, q_segment_bq = block
    visible_bqs = ((k_pos_bs[:, None, :] <= q_pos_bq[:, :, None])
                   & (kv_segment_bs[:, None, :] == q_segment_bq[:, :, None]))
    chunk_gap_bqs = q_pos_bq[:, :, None] // chunk_len - k_chunk_bs[:, None, :]
    masks = (chunk_gap_bqs == 0, chunk_gap_bqs == 1, chunk_gap_bqs >= 2)
    outs, lses = zip(*(
        _partial_attention(q_bqhd.reshape(b, -1, hkv, hq // hkv, d), k_rot_bskd, v_bskd,
                           visible_bqs & part_bqs, scale)
        for q_bqhd, part_bqs in zip(q_parts, masks)))
    return _merge(outs, lses)

  block = min(block_q, t)
  out_ibqkgd = jax.lax.map(attend, (
      tuple(_blocks(x, block) for x in (q_intra_bthd, q_succ_bthd, q_inter_bthd)),
      _blocks(q_pos_bt, block), _blocks(q_segment_bt, block)))
  out_bthd = jnp.moveaxis(out_ibqkgd, 0, 1).reshape(b, -1, hq, d)[:, :t]
  return out_bthd.astype(q_bthd.dtype)
