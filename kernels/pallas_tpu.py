"""Flash attention kernels for TPUs: Pallas with the Mosaic lowering.

TPU blocks must tile the last two dimensions by (8, 128), so the kernels work on
[B, H, L, D] (transposed here) with head_dim zero-padded to a multiple of 128, and the key
blocks are a grid dimension: each step DMAs one K/V block into VMEM while running
accumulators (max, sum, output) live in VMEM scratch. Per-row values (mask intervals,
positions, segments, log-sum-exp, delta) are kept replicated across `lanes` columns, the
TPU's layout for a column vector, and tiled out to a block's width.

The visible block ranges are scalar-prefetched into SMEM; the index maps clamp hidden
steps onto a visible block, so a skipped step neither computes nor fetches a new block.
  forward  grid (B, Hq, query blocks, key blocks)
  dQ       grid (B, Hq, query blocks, key blocks)
  dK/dV    grid (B, Hkv, key blocks, group heads, query blocks): the group's query heads
           are summed in the scratch accumulators (deterministic, no atomics).
On a CPU backend they run under the TPU interpret mode, which also checks for
out-of-bounds reads and starts every buffer as NaN.
"""
import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from lmlab.kernels import pallas_common as common

MIN_BLOCK = 128
LANES = 128


def padded_head_dim(d: int) -> int:
  return -(-d // LANES) * LANES


def default_blocks(head_dim: int) -> common.BlockSizes:
  """Conservative tiles that fit VMEM for head_dim up to 256; not tuned on hardware."""
  del head_dim
  return common.BlockSizes.uniform(128)


def _interpret(settings):
  if not settings.interpret:
    return False
  params = getattr(pltpu, 'InterpretParams', None)
  return params() if params is not None else True


def _semantics(*kinds):
  return pltpu.CompilerParams(dimension_semantics=kinds)


def _lanes(settings) -> int:
  blocks = settings.blocks
  return min(LANES, blocks.k, blocks.k_dq, blocks.k_dkv)


def _wide(x, width: int):
  """Tile a lane-replicated [rows, lanes] value out to [rows, width]."""
  reps = width // x.shape[1]
  return jnp.tile(x, (1, reps)) if reps > 1 else x


def _clamp(step, first, last, n):
  """The block to hold at grid step `step`: itself inside [first, last), else the nearest one."""
  return jnp.minimum(jnp.maximum(step, first), jnp.maximum(jnp.minimum(last, n) - 1, 0))


def _rows_vectors(mask, lanes):
  """Per-row mask vectors, lane-replicated: {name: [B, T_pad, lanes] int32}."""
  rows = dict(lo=mask.row_lo, hi=mask.row_hi, q_pos=mask.q_pos, q_seg=mask.q_seg)
  return {name: jnp.broadcast_to(x[:, :, None], (*x.shape, lanes))
          for name, x in rows.items() if x is not None}


def _row_terms(refs, width):
  terms = {}
  for name in ('lo', 'hi', 'q_pos', 'q_seg'):
    if name in refs:
      terms[name] = _wide(refs[name][...], width)
  return terms


def _logits(q_blk, k_blk, j, refs, settings, slope):
  block_k = k_blk.shape[0]
  kv_seg = refs.get('kv_seg')
  k_pos = j * block_k + jax.lax.broadcasted_iota(jnp.int32, (1, block_k), 1)
  return common.block_logits(
      common.dot_nt(q_blk, k_blk), k_pos, scale=settings.scale, causal=settings.causal,
      slope=slope, kv_seg=None if kv_seg is None else kv_seg[...],
      **_row_terms(refs, block_k))


def _to_heads_major(x):
  return x.transpose(0, 2, 1, 3)


def _mask_inputs(mask, lanes, *, rows_map, kv_map, block_q, block_k):
  inputs = {name: (x, pl.BlockSpec((None, block_q, lanes), rows_map))
            for name, x in _rows_vectors(mask, lanes).items()}
  if mask.kv_seg is not None:
    inputs['kv_seg'] = (mask.kv_seg[:, None, :], pl.BlockSpec((None, 1, block_k), kv_map))
  return inputs


def _scalars(first, last, mask):
  scalars = dict(first=first.reshape(-1), last=last.reshape(-1))
  if mask.slopes is not None:
    scalars['slopes'] = mask.slopes
  return scalars


def _forward_kernel(*, first, last, q, k, v, out, lse, m_scr, l_scr, acc_scr, settings,
                    slopes=None, **refs):
  b, h, i, j = (pl.program_id(axis) for axis in range(4))
  step = b * pl.num_programs(2) + i

  @pl.when(j == 0)
  def _():
    m_scr[...] = jnp.full(m_scr.shape, -jnp.inf, jnp.float32)
    l_scr[...] = jnp.zeros(l_scr.shape, jnp.float32)
    acc_scr[...] = jnp.zeros(acc_scr.shape, jnp.float32)

  @pl.when((j >= first[step]) & (j < last[step]))
  def _():
    logits = _logits(q[...], k[...], j, refs, settings, None if slopes is None else slopes[h])
    m_prev = m_scr[...]
    m_new = jnp.maximum(m_prev, jnp.max(logits, axis=1, keepdims=True))
    shift = jnp.where(m_new == -jnp.inf, 0.0, m_new)
    probs = jnp.exp2(logits - _wide(shift, logits.shape[1]))
    correction = jnp.exp2(m_prev - shift)
    l_scr[...] = l_scr[...] * correction + jnp.sum(probs, axis=1, keepdims=True)
    m_scr[...] = m_new
    acc_scr[...] = (acc_scr[...] * _wide(correction, acc_scr.shape[1])
                    + common.dot_nn(probs.astype(v.dtype), v[...]))

  @pl.when(j == pl.num_programs(3) - 1)
  def _():
    l = l_scr[...]
    empty = l == 0.0
    safe_l = jnp.where(empty, 1.0, l)
    out[...] = (acc_scr[...] / _wide(safe_l, acc_scr.shape[1])).astype(out.dtype)
    lse[...] = jnp.where(empty, jnp.inf, m_scr[...] + jnp.log2(safe_l))


def forward(q, k, v, mask, settings):
  """q [B, T_pad, Hq, Dp], k/v [B, S_pad, Hkv, Dp] -> (out like q, lse [B, Hq, T_pad, lanes])."""
  b, t_pad, hq, d = q.shape
  s_pad, hkv = k.shape[1], k.shape[2]
  groups, lanes = hq // hkv, _lanes(settings)
  block_q, block_k = settings.blocks.q, settings.blocks.k
  n_k = s_pad // block_k
  first, last = mask.key_blocks(block_q, block_k)

  def key_block(b, i, j, first, last):
    step = b * (t_pad // block_q) + i
    return _clamp(j, first[step], last[step], n_k)

  q_spec = pl.BlockSpec((None, None, block_q, d), lambda b, h, i, j, *_: (b, h, i, 0))
  kv_spec = pl.BlockSpec((None, None, block_k, d), lambda b, h, i, j, first, last, *_: (
      b, jax.lax.div(h, groups), key_block(b, i, j, first, last), 0))
  inputs = dict(q=(_to_heads_major(q), q_spec), k=(_to_heads_major(k), kv_spec),
                v=(_to_heads_major(v), kv_spec))
  inputs.update(_mask_inputs(
      mask, lanes, rows_map=lambda b, h, i, j, *_: (b, i, 0),
      kv_map=lambda b, h, i, j, first, last, *_: (b, 0, key_block(b, i, j, first, last)),
      block_q=block_q, block_k=block_k))
  outputs = dict(
      out=(jax.ShapeDtypeStruct((b, hq, t_pad, d), q.dtype), q_spec),
      lse=(jax.ShapeDtypeStruct((b, hq, t_pad, lanes), jnp.float32),
           pl.BlockSpec((None, None, block_q, lanes), lambda b, h, i, j, *_: (b, h, i, 0))))
  scratch = dict(m_scr=pltpu.VMEM((block_q, lanes), jnp.float32),
                 l_scr=pltpu.VMEM((block_q, lanes), jnp.float32),
                 acc_scr=pltpu.VMEM((block_q, d), jnp.float32))
  out, lse = common.call(
      lambda **refs: _forward_kernel(settings=settings, **refs),
      grid=(b, hq, t_pad // block_q, n_k), scalars=_scalars(first, last, mask), inputs=inputs,
      outputs=outputs, scratch=scratch, settings=settings, name='flash_attention_forward',
      interpret=_interpret(settings),
      compiler_params=_semantics('parallel', 'parallel', 'parallel', 'arbitrary'))
  return _to_heads_major(out), lse


def _dq_kernel(*, first, last, q, k, v, d_out, lse, delta, dq, dq_scr, settings, slopes=None,
               **refs):
  b, h, i, j = (pl.program_id(axis) for axis in range(4))
  step = b * pl.num_programs(2) + i

  @pl.when(j == 0)
  def _():
    dq_scr[...] = jnp.zeros(dq_scr.shape, jnp.float32)

  @pl.when((j >= first[step]) & (j < last[step]))
  def _():
    k_blk = k[...]
    logits = _logits(q[...], k_blk, j, refs, settings, None if slopes is None else slopes[h])
    width = logits.shape[1]
    _, d_logits = common.softmax_grad(logits, _wide(lse[...], width),
                                      common.dot_nt(d_out[...], v[...]),
                                      _wide(delta[...], width), settings.scale)
    dq_scr[...] += common.dot_nn(d_logits.astype(k_blk.dtype), k_blk)

  @pl.when(j == pl.num_programs(3) - 1)
  def _():
    dq[...] = dq_scr[...].astype(dq.dtype)


def _dkv_kernel(*, first, last, q, k, v, d_out, lse, delta, dk, dv, dk_scr, dv_scr, settings,
                groups, slopes=None, **refs):
  b, h, j, g, i = (pl.program_id(axis) for axis in range(5))
  step = b * pl.num_programs(2) + j

  @pl.when((g == 0) & (i == 0))
  def _():
    dk_scr[...] = jnp.zeros(dk_scr.shape, jnp.float32)
    dv_scr[...] = jnp.zeros(dv_scr.shape, jnp.float32)

  @pl.when((i >= first[step]) & (i < last[step]))
  def _():
    q_blk, do_blk = q[...], d_out[...]
    slope = None if slopes is None else slopes[h * groups + g]
    logits = _logits(q_blk, k[...], j, refs, settings, slope)
    width = logits.shape[1]
    probs, d_logits = common.softmax_grad(logits, _wide(lse[...], width),
                                          common.dot_nt(do_blk, v[...]),
                                          _wide(delta[...], width), settings.scale)
    dv_scr[...] += common.dot_tn(probs.astype(do_blk.dtype), do_blk)
    dk_scr[...] += common.dot_tn(d_logits.astype(q_blk.dtype), q_blk)

  @pl.when((g == pl.num_programs(3) - 1) & (i == pl.num_programs(4) - 1))
  def _():
    dk[...] = dk_scr[...].astype(dk.dtype)
    dv[...] = dv_scr[...].astype(dv.dtype)


def backward(q, k, v, d_out, lse, delta, mask, settings):
  """Padded inputs as in forward, d_out like q, delta [B, Hq, T_pad] -> (dq, dk, dv)."""
  b, t_pad, hq, d = q.shape
  s_pad, hkv = k.shape[1], k.shape[2]
  groups, lanes = hq // hkv, _lanes(settings)
  blocks = settings.blocks
  q_bhtd, k_bksd, v_bksd, do_bhtd = map(_to_heads_major, (q, k, v, d_out))
  delta = jnp.broadcast_to(delta[..., None], (*delta.shape, lanes))
  interpret = _interpret(settings)

  # dQ: the forward's grid, accumulating over key blocks.
  block_q, block_k = blocks.q_dq, blocks.k_dq
  n_q, n_k = t_pad // block_q, s_pad // block_k
  first, last = mask.key_blocks(block_q, block_k)

  def key_block(b, i, j, first, last):
    return _clamp(j, first[b * n_q + i], last[b * n_q + i], n_k)

  q_spec = pl.BlockSpec((None, None, block_q, d), lambda b, h, i, j, *_: (b, h, i, 0))
  row_spec = pl.BlockSpec((None, None, block_q, lanes), lambda b, h, i, j, *_: (b, h, i, 0))
  kv_spec = pl.BlockSpec((None, None, block_k, d), lambda b, h, i, j, first, last, *_: (
      b, jax.lax.div(h, groups), key_block(b, i, j, first, last), 0))
  inputs = dict(q=(q_bhtd, q_spec), k=(k_bksd, kv_spec), v=(v_bksd, kv_spec),
                d_out=(do_bhtd, q_spec), lse=(lse, row_spec), delta=(delta, row_spec))
  inputs.update(_mask_inputs(
      mask, lanes, rows_map=lambda b, h, i, j, *_: (b, i, 0),
      kv_map=lambda b, h, i, j, first, last, *_: (b, 0, key_block(b, i, j, first, last)),
      block_q=block_q, block_k=block_k))
  [dq] = common.call(
      lambda **refs: _dq_kernel(settings=settings, **refs), grid=(b, hq, n_q, n_k),
      scalars=_scalars(first, last, mask), inputs=inputs,
      outputs=dict(dq=(jax.ShapeDtypeStruct(q_bhtd.shape, q.dtype), q_spec)),
      scratch=dict(dq_scr=pltpu.VMEM((block_q, d), jnp.float32)), settings=settings,
      name='flash_attention_dq', interpret=interpret,
      compiler_params=_semantics('parallel', 'parallel', 'parallel', 'arbitrary'))

  # dK, dV: per key block, over the group's query heads and the query blocks that see it.
  block_q, block_k = blocks.q_dkv, blocks.k_dkv
  n_q, n_k = t_pad // block_q, s_pad // block_k
  first, last = mask.query_blocks(block_q, block_k)

  def query_block(b, j, i, first, last):
    return _clamp(i, first[b * n_k + j], last[b * n_k + j], n_q)

  q_spec = pl.BlockSpec((None, None, block_q, d), lambda b, h, j, g, i, first, last, *_: (
      b, h * groups + g, query_block(b, j, i, first, last), 0))
  row_spec = pl.BlockSpec((None, None, block_q, lanes), lambda b, h, j, g, i, first, last, *_: (
      b, h * groups + g, query_block(b, j, i, first, last), 0))
  kv_spec = pl.BlockSpec((None, None, block_k, d), lambda b, h, j, g, i, *_: (b, h, j, 0))
  inputs = dict(q=(q_bhtd, q_spec), k=(k_bksd, kv_spec), v=(v_bksd, kv_spec),
                d_out=(do_bhtd, q_spec), lse=(lse, row_spec), delta=(delta, row_spec))
  inputs.update(_mask_inputs(
      mask, lanes,
      rows_map=lambda b, h, j, g, i, first, last, *_: (b, query_block(b, j, i, first, last), 0),
      kv_map=lambda b, h, j, g, i, *_: (b, 0, j), block_q=block_q, block_k=block_k))
  outputs = dict(dk=(jax.ShapeDtypeStruct(k_bksd.shape, k.dtype), kv_spec),
                 dv=(jax.ShapeDtypeStruct(v_bksd.shape, v.dtype), kv_spec))
  scratch = dict(dk_scr=pltpu.VMEM((block_k, d), jnp.float32),
                 dv_scr=pltpu.VMEM((block_k, d), jnp.float32))
  dk, dv = common.call(
      lambda **refs: _dkv_kernel(settings=settings, groups=groups, **refs),
      grid=(b, hkv, n_k, groups, n_q), scalars=_scalars(first, last, mask), inputs=inputs,
      outputs=outputs, scratch=scratch, settings=settings, name='flash_attention_dkv',
      interpret=interpret,
      compiler_params=_semantics('parallel', 'parallel', 'parallel', 'arbitrary', 'arbitrary'))
  return _to_heads_major(dq), _to_heads_major(dk), _to_heads_major(dv)
