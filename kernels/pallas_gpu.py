"""Flash attention kernels for GPUs: Pallas with the Triton lowering.

Arrays keep the [B, L, H, D] layout; a BlockSpec squeezes batch and head, and K/V's index
map sends query head h to KV head h // groups, so GQA/MQA never copies K or V. Three
kernels, each writing its own output blocks (deterministic, no atomics):
  forward  grid (query blocks, B, Hq): online softmax over the visible key blocks; saves
           the log-sum-exp (in bits) for the backward pass.
  dQ       grid (query blocks, B, Hq): recomputes each visible block's probabilities.
  dK/dV    grid (key blocks, B, Hkv): loops over the group's query heads and the query
           blocks that see the key block, summing the group's contributions in registers.
Triton wants power-of-two tiles, so head_dim is zero-padded to one (at least 16) and the
block sizes are powers of two. On a CPU backend the same kernels run in interpret mode.
"""
import contextlib

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from lmlab.kernels import pallas_common as common

MIN_BLOCK = 16


def padded_head_dim(d: int) -> int:
  return max(16, pl.next_power_of_2(d))


def lowering_target(device_kind: str = 'NVIDIA H100 80GB HBM3'):
  """A context in which JAX lowers the kernels for a `device_kind` GPU that is not present.

  JAX 0.11 and later read the target's compute capability while lowering to Triton, and
  fail without a GPU unless an abstract one is given. Releases whose AbstractDevice has no
  platform (before 0.10.1) lower for sm_90 regardless, so there this does nothing.
  """
  try:
    gpu = jax.sharding.AbstractDevice(device_kind=device_kind, num_cores=None, platform='gpu')
  except (AttributeError, TypeError):
    return contextlib.nullcontext()
  return jax.sharding.use_abstract_mesh(
      jax.sharding.AbstractMesh((1,), ('x',), abstract_device=gpu))


def default_blocks(head_dim: int) -> common.BlockSizes:
  """Tiles chosen to keep each program's accumulators near 64-128 registers a thread at
  the warp counts below; not yet tuned on hardware."""
  if head_dim <= 64:
    return common.BlockSizes(q=128, k=64, q_dkv=64, k_dkv=64, q_dq=64, k_dq=64)
  if head_dim <= 128:
    return common.BlockSizes(q=128, k=64, q_dkv=32, k_dkv=64, q_dq=64, k_dq=32)
  return common.BlockSizes(q=64, k=32, q_dkv=32, k_dkv=32, q_dq=32, k_dq=32)


def _compiler_params(rows: int, head_dim: int):
  num_warps = 8 if rows * head_dim >= 64 * 128 else 4
  return plgpu.CompilerParams(num_warps=num_warps, num_stages=2)


def _row_terms(mask_refs, rows=...):
  """block_logits' per-row arguments ([bq, 1]) for the rows `rows` of the row vectors."""
  terms = dict(lo=mask_refs['lo'][rows][:, None], hi=mask_refs['hi'][rows][:, None])
  if 'q_pos' in mask_refs:
    terms['q_pos'] = mask_refs['q_pos'][rows][:, None]
  if 'q_seg' in mask_refs:
    terms['q_seg'] = mask_refs['q_seg'][rows][:, None]
  return terms


def _mask_inputs(mask, *, rows_spec, kv_spec, slope_spec):
  """The mask's vectors as kernel inputs (absent features are left out)."""
  inputs = dict(lo=(mask.row_lo, rows_spec), hi=(mask.row_hi, rows_spec))
  if mask.q_pos is not None:
    inputs['q_pos'] = (mask.q_pos, rows_spec)
    inputs['slope'] = (mask.slopes, slope_spec)
  if mask.q_seg is not None:
    inputs['q_seg'] = (mask.q_seg, rows_spec)
    inputs['kv_seg'] = (mask.kv_seg, kv_spec)
  return inputs


def _split(refs):
  """(mask refs, slope ref or None, kv_seg ref or None) from a kernel's keyword refs."""
  mask_refs = {name: refs.pop(name) for name in ('lo', 'hi', 'q_pos', 'q_seg') if name in refs}
  return mask_refs, refs.pop('slope', None), refs.pop('kv_seg', None)


def _key_block(j, block_k, q_blk, k, kv_seg, slope, rows, settings):
  """(key slice, key block, masked logits of the query block against it) for key block j."""
  keys = pl.ds(j * block_k, block_k)
  k_blk = k[keys, :]
  logits = common.block_logits(
      common.dot_nt(q_blk, k_blk), j * block_k + jnp.arange(block_k)[None, :],
      scale=settings.scale, causal=settings.causal, slope=slope,
      kv_seg=None if kv_seg is None else kv_seg[keys][None, :], **rows)
  return keys, k_blk, logits


def _forward_kernel(*, q, k, v, first, last, out, lse, settings, **refs):
  mask_refs, slope, kv_seg = _split(refs)
  block_k = settings.blocks.k
  q_blk = q[...]
  rows = _row_terms(mask_refs)
  slope = None if slope is None else slope[...]

  def visit(j, carry):
    acc, m, l = carry
    keys, _, logits = _key_block(j, block_k, q_blk, k, kv_seg, slope, rows, settings)
    m_new = jnp.maximum(m, jnp.max(logits, axis=1))
    shift = jnp.where(m_new == -jnp.inf, 0.0, m_new)
    probs = jnp.exp2(logits - shift[:, None])
    correction = jnp.exp2(m - shift)
    l = l * correction + jnp.sum(probs, axis=1)
    acc = acc * correction[:, None] + common.dot_nn(probs.astype(v.dtype), v[keys, :])
    return acc, m_new, l

  block_q, d = q_blk.shape
  acc, m, l = jax.lax.fori_loop(first[...], last[...], visit, (
      jnp.zeros((block_q, d), jnp.float32), jnp.full((block_q,), -jnp.inf, jnp.float32),
      jnp.zeros((block_q,), jnp.float32)))
  empty = l == 0.0
  safe_l = jnp.where(empty, 1.0, l)
  out[...] = (acc / safe_l[:, None]).astype(out.dtype)
  lse[...] = jnp.where(empty, jnp.inf, m + jnp.log2(safe_l))


def forward(q, k, v, mask, settings):
  """q [B, T_pad, Hq, Dp], k/v [B, S_pad, Hkv, Dp] -> (out like q, lse [B, Hq, T_pad])."""
  b, t_pad, hq, d = q.shape
  s_pad, hkv = k.shape[1], k.shape[2]
  groups = hq // hkv
  block_q = settings.blocks.q
  first, last = mask.key_blocks(block_q, settings.blocks.k)
  q_spec = pl.BlockSpec((None, block_q, None, d), lambda i, b, h: (b, i, h, 0))
  kv_spec = pl.BlockSpec((None, s_pad, None, d), lambda i, b, h: (b, 0, jax.lax.div(h, groups), 0))
  range_spec = pl.BlockSpec((None, None), lambda i, b, h: (b, i))
  inputs = dict(q=(q, q_spec), k=(k, kv_spec), v=(v, kv_spec), first=(first, range_spec),
                last=(last, range_spec))
  inputs.update(_mask_inputs(
      mask, rows_spec=pl.BlockSpec((None, block_q), lambda i, b, h: (b, i)),
      kv_spec=pl.BlockSpec((None, s_pad), lambda i, b, h: (b, 0)),
      slope_spec=pl.BlockSpec((None,), lambda i, b, h: (h,))))
  outputs = dict(
      out=(jax.ShapeDtypeStruct(q.shape, q.dtype), q_spec),
      lse=(jax.ShapeDtypeStruct((b, hq, t_pad), jnp.float32),
           pl.BlockSpec((None, None, block_q), lambda i, b, h: (b, h, i))))
  kernel = lambda **refs: _forward_kernel(settings=settings, **refs)
  out, lse = common.call(kernel, grid=(t_pad // block_q, b, hq), inputs=inputs, outputs=outputs,
                         settings=settings, name='flash_attention_forward',
                         interpret=settings.interpret,
                         compiler_params=_compiler_params(block_q, d))
  return out, lse


def _dq_kernel(*, q, k, v, d_out, lse, delta, first, last, dq, settings, **refs):
  mask_refs, slope, kv_seg = _split(refs)
  block_k = settings.blocks.k_dq
  q_blk, do_blk = q[...], d_out[...]
  lse_q1, delta_q1 = lse[...][:, None], delta[...][:, None]
  rows = _row_terms(mask_refs)
  slope = None if slope is None else slope[...]

  def visit(j, dq_acc):
    keys, k_blk, logits = _key_block(j, block_k, q_blk, k, kv_seg, slope, rows, settings)
    _, d_logits = common.softmax_grad(logits, lse_q1, common.dot_nt(do_blk, v[keys, :]),
                                      delta_q1, settings.scale)
    return dq_acc + common.dot_nn(d_logits.astype(k_blk.dtype), k_blk)

  dq_acc = jax.lax.fori_loop(first[...], last[...], visit, jnp.zeros(q_blk.shape, jnp.float32))
  dq[...] = dq_acc.astype(dq.dtype)


def _dkv_kernel(*, q, k, v, d_out, lse, delta, first, last, dk, dv, settings, groups, **refs):
  mask_refs, slope, kv_seg = _split(refs)
  block_q = settings.blocks.q_dkv
  k_blk, v_blk = k[...], v[...]
  block_k = k_blk.shape[0]
  k_pos = pl.program_id(0) * block_k + jnp.arange(block_k)[None, :]
  kv_seg_1s = None if kv_seg is None else kv_seg[...][None, :]

  def visit_head(g, carry):
    head_slope = None if slope is None else slope[g]

    def visit(i, carry):
      dk_acc, dv_acc = carry
      rows = pl.ds(i * block_q, block_q)
      q_blk, do_blk = q[rows, g, :], d_out[rows, g, :]
      logits = common.block_logits(
          common.dot_nt(q_blk, k_blk), k_pos, scale=settings.scale, causal=settings.causal,
          slope=head_slope, kv_seg=kv_seg_1s, **_row_terms(mask_refs, rows))
      probs, d_logits = common.softmax_grad(
          logits, lse[g, rows][:, None], common.dot_nt(do_blk, v_blk), delta[g, rows][:, None],
          settings.scale)
      dv_acc = dv_acc + common.dot_tn(probs.astype(do_blk.dtype), do_blk)
      dk_acc = dk_acc + common.dot_tn(d_logits.astype(q_blk.dtype), q_blk)
      return dk_acc, dv_acc

    return jax.lax.fori_loop(first[...], last[...], visit, carry)

  zeros = jnp.zeros(k_blk.shape, jnp.float32)
  dk_acc, dv_acc = jax.lax.fori_loop(0, groups, visit_head, (zeros, zeros))
  dk[...] = dk_acc.astype(dk.dtype)
  dv[...] = dv_acc.astype(dv.dtype)


def backward(q, k, v, d_out, lse, delta, mask, settings):
  """Padded inputs as in forward, d_out like q, delta [B, Hq, T_pad] -> (dq, dk, dv)."""
  b, t_pad, hq, d = q.shape
  s_pad, hkv = k.shape[1], k.shape[2]
  groups = hq // hkv
  blocks = settings.blocks

  # dQ: one program per (query block, batch, query head).
  block_q = blocks.q_dq
  first, last = mask.key_blocks(block_q, blocks.k_dq)
  q_spec = pl.BlockSpec((None, block_q, None, d), lambda i, b, h: (b, i, h, 0))
  kv_spec = pl.BlockSpec((None, s_pad, None, d), lambda i, b, h: (b, 0, jax.lax.div(h, groups), 0))
  row_spec = pl.BlockSpec((None, None, block_q), lambda i, b, h: (b, h, i))
  range_spec = pl.BlockSpec((None, None), lambda i, b, h: (b, i))
  inputs = dict(q=(q, q_spec), k=(k, kv_spec), v=(v, kv_spec), d_out=(d_out, q_spec),
                lse=(lse, row_spec), delta=(delta, row_spec), first=(first, range_spec),
                last=(last, range_spec))
  inputs.update(_mask_inputs(
      mask, rows_spec=pl.BlockSpec((None, block_q), lambda i, b, h: (b, i)),
      kv_spec=pl.BlockSpec((None, s_pad), lambda i, b, h: (b, 0)),
      slope_spec=pl.BlockSpec((None,), lambda i, b, h: (h,))))
  [dq] = common.call(
      lambda **refs: _dq_kernel(settings=settings, **refs), grid=(t_pad // block_q, b, hq),
      inputs=inputs, outputs=dict(dq=(jax.ShapeDtypeStruct(q.shape, q.dtype), q_spec)),
      settings=settings, name='flash_attention_dq', interpret=settings.interpret,
      compiler_params=_compiler_params(block_q, d))

  # dK, dV: one program per (key block, batch, KV head), over the group's query heads.
  block_k = blocks.k_dkv
  first, last = mask.query_blocks(blocks.q_dkv, block_k)
  group_spec = pl.BlockSpec((None, t_pad, groups, d), lambda j, b, h: (b, 0, h, 0))
  group_rows_spec = pl.BlockSpec((None, groups, t_pad), lambda j, b, h: (b, h, 0))
  kv_spec = pl.BlockSpec((None, block_k, None, d), lambda j, b, h: (b, j, h, 0))
  range_spec = pl.BlockSpec((None, None), lambda j, b, h: (b, j))
  inputs = dict(q=(q, group_spec), k=(k, kv_spec), v=(v, kv_spec), d_out=(d_out, group_spec),
                lse=(lse, group_rows_spec), delta=(delta, group_rows_spec),
                first=(first, range_spec), last=(last, range_spec))
  inputs.update(_mask_inputs(
      mask, rows_spec=pl.BlockSpec((None, t_pad), lambda j, b, h: (b, 0)),
      kv_spec=pl.BlockSpec((None, block_k), lambda j, b, h: (b, j)),
      slope_spec=pl.BlockSpec((groups,), lambda j, b, h: (h,))))
  outputs = dict(dk=(jax.ShapeDtypeStruct(k.shape, k.dtype), kv_spec),
                 dv=(jax.ShapeDtypeStruct(v.shape, v.dtype), kv_spec))
  dk, dv = common.call(
      lambda **refs: _dkv_kernel(settings=settings, groups=groups, **refs),
      grid=(s_pad // block_k, b, hkv), inputs=inputs, outputs=outputs, settings=settings,
      name='flash_attention_dkv', interpret=settings.interpret,
      compiler_params=_compiler_params(block_k, d))
  return dq, dk, dv
