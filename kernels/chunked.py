"""Blockwise attention in pure JAX: O(T) memory forward and backward.

Queries are taken a block at a time; for each, the key blocks it can see are visited in a
loop with an online softmax (running max m, running sum l, running output), as in
FlashAttention (Dao et al. 2022). Key blocks that the mask hides entirely (after the
diagonal when causal, before the window with a sliding window) are not visited. The
backward pass is written by hand (a custom VJP): it recomputes each block's probabilities
from the saved log-sum-exp instead of storing the [T, S] matrix.
"""
import functools

import jax
import jax.numpy as jnp

from lmlab.kernels import masks


def _pad_to(x, axis: int, multiple: int):
  extra = -x.shape[axis] % multiple
  if not extra:
    return x
  widths = [(0, 0)] * x.ndim
  widths[axis] = (0, extra)
  return jnp.pad(x, widths)


class _Problem:
  """Shapes, block layout and the mask description of one attention call.

  `arrays` holds the array-valued parts of the mask (segment ids, prefix lengths, ALiBi
  slopes, query offset; absent ones are None), `static` the hashable ones.
  """

  def __init__(self, q, k, arrays, static):
    self.b, self.t, self.hq, self.d = q.shape
    self.s, self.hkv = k.shape[1], k.shape[2]
    self.groups = self.hq // self.hkv
    self.causal, self.sliding_window, self.scale, block_q, block_k = static
    self.block_q, self.block_k = min(block_q, self.t), min(block_k, self.s)
    self.n_q = -(-self.t // self.block_q)
    self.n_k = -(-self.s // self.block_k)
    self.prefix_len, self.alibi_slopes = arrays['prefix_len'], arrays['alibi_slopes']
    self.q_offset = jnp.asarray(arrays['q_offset']).reshape(-1, 1)
    self.segments = None
    if arrays['segment_ids'] is not None:
      q_seg, kv_seg = arrays['segment_ids']
      self.segments = (_pad_to(q_seg, 1, self.block_q), _pad_to(kv_seg, 1, self.block_k))

  def q_positions(self, i):
    """[B or 1, block_q] absolute positions of query block i."""
    return self.q_offset + (i * self.block_q + jnp.arange(self.block_q))[None, :]

  def k_positions(self, j):
    return j * self.block_k + jnp.arange(self.block_k)

  def _skips_after_diagonal(self):
    # A prefix makes keys past the diagonal visible, so nothing is skipped then.
    return self.causal and self.prefix_len is None

  def key_block_range(self, i):
    """[first, last) key blocks that query block i can see at all."""
    positions = self.q_positions(i)
    first, last = 0, self.n_k
    if self._skips_after_diagonal():
      last = jnp.clip(jnp.max(positions) // self.block_k + 1, 0, self.n_k)
    if self.sliding_window is not None:
      first = jnp.clip((jnp.min(positions) - self.sliding_window + 1) // self.block_k, 0,
                       self.n_k)
    return first, jnp.maximum(first, last)

  def query_block_range(self, j):
    """[first, last) query blocks that can see key block j at all."""
    k_first, k_last = j * self.block_k, (j + 1) * self.block_k - 1
    first, last = 0, self.n_q
    if self._skips_after_diagonal():
      first = jnp.clip((k_first - jnp.max(self.q_offset)) // self.block_q, 0, self.n_q)
    if self.sliding_window is not None:
      reach = k_last + self.sliding_window - jnp.min(self.q_offset)
      last = jnp.clip((reach - 1) // self.block_q + 1, 0, self.n_q)
    return first, jnp.maximum(first, last)

  def scores(self, q_blk, k_blk, i, j):
    """Masked scores [B, Hkv, G, block_q, block_k] in float32 (-inf where hidden)."""
    s = jnp.einsum('bqkgd,bskd->bkgqs', q_blk, k_blk,
                   preferred_element_type=jnp.float32) * self.scale
    q_pos, k_pos = self.q_positions(i), self.k_positions(j)
    q_seg = kv_seg = None
    if self.segments is not None:
      q_seg = jax.lax.dynamic_slice_in_dim(self.segments[0], i * self.block_q, self.block_q, 1)
      kv_seg = jax.lax.dynamic_slice_in_dim(self.segments[1], j * self.block_k, self.block_k, 1)
    visible = masks.visible(q_pos, k_pos, causal=self.causal, sliding_window=self.sliding_window,
                            prefix_len=self.prefix_len, q_segment=q_seg, kv_segment=kv_seg)
    visible = visible & (k_pos < self.s)[None, None, :]  # Padding keys of the last block.
    if self.alibi_slopes is not None:
      bias = masks.alibi_bias(self.alibi_slopes, q_pos, k_pos, causal=self.causal)
      s = s + bias.reshape(bias.shape[0], self.hkv, self.groups, self.block_q, self.block_k)
    return jnp.where(visible[:, None, None], s, -jnp.inf)


def _blocks(p: _Problem, q, k, v):
  """q as [n_q, B, block_q, Hkv, G, D]; k, v as [n_k, B, block_k, Hkv, D] (zero-padded)."""
  q = _pad_to(q, 1, p.block_q).reshape(p.b, p.n_q, p.block_q, p.hkv, p.groups, p.d)
  k = _pad_to(k, 1, p.block_k).reshape(p.b, p.n_k, p.block_k, p.hkv, p.d)
  v = _pad_to(v, 1, p.block_k).reshape(p.b, p.n_k, p.block_k, p.hkv, p.d)
  return q.swapaxes(0, 1), k.swapaxes(0, 1), v.swapaxes(0, 1)


def _forward(p: _Problem, q, k, v):
  """(output [B, T, Hq, D], log-sum-exp [n_q, B, Hkv, G, block_q]; +inf for empty rows)."""
  q_blocks, k_blocks, v_blocks = _blocks(p, q, k, v)

  def one_query_block(i):
    q_blk = q_blocks[i]
    shape = (p.b, p.hkv, p.groups, p.block_q)

    def visit(j, carry):
      m, l, acc = carry
      s = p.scores(q_blk, k_blocks[j], i, j)
      m_new = jnp.maximum(m, jnp.max(s, axis=-1))
      shift = jnp.where(jnp.isfinite(m_new), m_new, 0.0)
      weights = jnp.exp(s - shift[..., None])
      correction = jnp.exp(m - shift)
      l = l * correction + jnp.sum(weights, axis=-1)
      acc = acc * correction[..., None] + jnp.einsum(
          'bkgqs,bskd->bkgqd', weights, v_blocks[j].astype(jnp.float32))
      return m_new, l, acc

    first, last = p.key_block_range(i)
    m, l, acc = jax.lax.fori_loop(first, last, visit, (
        jnp.full(shape, -jnp.inf), jnp.zeros(shape), jnp.zeros(shape + (p.d,))))
    empty = l == 0.0
    out = acc / jnp.where(empty, 1.0, l)[..., None]
    lse = jnp.where(empty, jnp.inf, m + jnp.log(jnp.where(empty, 1.0, l)))
    return out, lse

  out, lse = jax.lax.map(one_query_block, jnp.arange(p.n_q))
  # out: [n_q, B, Hkv, G, block_q, D] -> [B, T, Hq, D]
  out = out.transpose(1, 0, 4, 2, 3, 5).reshape(p.b, p.n_q * p.block_q, p.hq, p.d)
  return out[:, :p.t].astype(q.dtype), lse


def _backward(p: _Problem, q, k, v, out, lse, d_out):
  q_blocks, k_blocks, v_blocks = _blocks(p, q, k, v)
  do_blocks = _blocks(p, d_out, k, v)[0].astype(jnp.float32)
  o_blocks = _blocks(p, out, k, v)[0].astype(jnp.float32)
  # delta_i = sum_d dO_i * O_i, the row term of the softmax gradient.
  delta = jnp.einsum('ibqkgd,ibqkgd->ibkgq', do_blocks, o_blocks)

  def probabilities(i, j):
    return jnp.exp(p.scores(q_blocks[i], k_blocks[j], i, j) - lse[i][..., None])

  def score_grad(i, j, probs):
    dp = jnp.einsum('bqkgd,bskd->bkgqs', do_blocks[i], v_blocks[j].astype(jnp.float32))
    return probs * (dp - delta[i][..., None]) * p.scale

  def dq_block(i):
    def visit(j, dq):
      ds = score_grad(i, j, probabilities(i, j))
      return dq + jnp.einsum('bkgqs,bskd->bqkgd', ds, k_blocks[j].astype(jnp.float32))
    first, last = p.key_block_range(i)
    return jax.lax.fori_loop(first, last, visit, jnp.zeros(q_blocks[i].shape, jnp.float32))

  def dkv_block(j):
    def visit(i, carry):
      dk, dv = carry
      probs = probabilities(i, j)
      ds = score_grad(i, j, probs)
      dv = dv + jnp.einsum('bkgqs,bqkgd->bskd', probs, do_blocks[i])
      dk = dk + jnp.einsum('bkgqs,bqkgd->bskd', ds, q_blocks[i].astype(jnp.float32))
      return dk, dv
    zeros = jnp.zeros(k_blocks[j].shape, jnp.float32)
    first, last = p.query_block_range(j)
    return jax.lax.fori_loop(first, last, visit, (zeros, zeros))

  dq = jax.lax.map(dq_block, jnp.arange(p.n_q))
  dk, dv = jax.lax.map(dkv_block, jnp.arange(p.n_k))
  dq = dq.swapaxes(0, 1).reshape(p.b, p.n_q * p.block_q, p.hq, p.d)[:, :p.t]
  unblock = lambda x: x.swapaxes(0, 1).reshape(p.b, p.n_k * p.block_k, p.hkv, p.d)[:, :p.s]
  return dq.astype(q.dtype), unblock(dk).astype(k.dtype), unblock(dv).astype(v.dtype)


@functools.partial(jax.custom_vjp, nondiff_argnums=(4,))
def _attention(q, k, v, arrays, static):
  return _forward(_Problem(q, k, arrays, static), q, k, v)[0]


def _attention_fwd(q, k, v, arrays, static):
  out, lse = _forward(_Problem(q, k, arrays, static), q, k, v)
  return out, (q, k, v, arrays, out, lse)


def _attention_bwd(static, residuals, d_out):
  q, k, v, arrays, out, lse = residuals
  grads = _backward(_Problem(q, k, arrays, static), q, k, v, out, lse, d_out)
  return (*grads, None)  # The mask description gets no gradient.


_attention.defvjp(_attention_fwd, _attention_bwd)


def default_block(length: int) -> int:
  """A block size that measured well on CPU (64 for short sequences, up to 256)."""
  return 64 if length <= 256 else 128 if length <= 1024 else 256


def attention(q, k, v, *, causal, sliding_window, segment_ids, prefix_len, alibi_slopes, scale,
              q_offset, block_q: int | None = None, block_k: int | None = None):
  block_q = block_q or default_block(q.shape[1])
  block_k = block_k or default_block(k.shape[1])
  arrays = dict(segment_ids=segment_ids, prefix_len=prefix_len, alibi_slopes=alibi_slopes,
                q_offset=q_offset)
  static = (bool(causal), sliding_window, float(scale), block_q, block_k)
  return _attention(q, k, v, arrays, static)
