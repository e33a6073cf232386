"""What the Pallas attention kernels share: the mask as O(T + S) vectors, its evaluation on a
block, the softmax-gradient and matmul steps, and pallas_call with named operands.

Every visibility rule of docs/DESIGN.md (causal, sliding window, prefix-LM, with the query
offset) leaves each query row an interval of visible keys, lo <= j <= hi, whose ends never
decrease from one row to the next; segment ids then remove keys inside it. So the mask
travels to the kernels as per-row vectors (lo, hi, the row's position for ALiBi, its segment)
and per-key segments, never as a [T, S] tensor, and the key blocks that a query block can
see at all (and the query blocks that can see a key block) are ranges computed from the same
intervals, so fully hidden blocks are skipped.

Both kernels, pallas_gpu.py (Triton lowering) and pallas_tpu.py (Mosaic), evaluate a block
with `block_logits` and work in base-2 exponents: logits are multiplied by log2(e), and the
saved log-sum-exp is in bits. A row with no visible key gets log-sum-exp +inf, which makes
its probabilities, output and gradients exactly zero. pallas.py picks one and runs it.
"""
import dataclasses
import math

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

LOG2_E = math.log2(math.e)


@dataclasses.dataclass(frozen=True)
class BlockSizes:
  """Rows and keys per block: forward (q, k), dK/dV kernel (q_dkv, k_dkv), dQ (q_dq, k_dq)."""
  q: int
  k: int
  q_dkv: int
  k_dkv: int
  q_dq: int
  k_dq: int

  @classmethod
  def uniform(cls, size: int) -> 'BlockSizes':
    return cls(size, size, size, size, size, size)

  def fitted(self, t: int, s: int, minimum: int) -> 'BlockSizes':
    """No block longer than the (power-of-two rounded) sequence it tiles needs."""
    q_cap = max(minimum, pl.next_power_of_2(t))
    k_cap = max(minimum, pl.next_power_of_2(s))
    return BlockSizes(min(self.q, q_cap), min(self.k, k_cap), min(self.q_dkv, q_cap),
                      min(self.k_dkv, k_cap), min(self.q_dq, q_cap), min(self.k_dq, k_cap))


@dataclasses.dataclass(frozen=True)
class Settings:
  """The static part of one call."""
  causal: bool
  sliding_window: int | None
  scale: float
  blocks: BlockSizes
  variant: str  # 'gpu' or 'tpu'
  interpret: bool
  poison: bool  # Fill every output with NaN before the kernel runs, so an unwritten block shows.


class Mask:
  """The mask description of one call as vectors over padded rows and keys.

  row_lo, row_hi: [B, T_pad] int32, the visible key interval of each row (padding rows get
    an empty one); q_pos: [B, T_pad] absolute positions (only with ALiBi); q_seg [B, T_pad],
    kv_seg [B, S_pad] int32 or None; slopes: [Hq] ALiBi slopes in bits per position, or None.
  """

  def __init__(self, arrays, settings: Settings, *, b, t, s, t_pad, s_pad):
    self.t, self.s, self.t_pad, self.s_pad = t, s, t_pad, s_pad
    q_offset_b1 = jnp.asarray(arrays['q_offset'], jnp.int32).reshape(-1, 1)
    p_bt = jnp.broadcast_to(q_offset_b1 + jnp.arange(t, dtype=jnp.int32)[None], (b, t))
    if settings.causal:
      hi_bt = p_bt
      if arrays['prefix_len'] is not None:
        # Inside the prefix a row sees the whole prefix; hi = prefix - 1 >= p there.
        prefix_b1 = jnp.asarray(arrays['prefix_len'], jnp.int32).reshape(-1, 1)
        hi_bt = jnp.maximum(hi_bt, prefix_b1 - 1)
      hi_bt = jnp.minimum(hi_bt, s - 1)
    else:
      hi_bt = jnp.full((b, t), s - 1, jnp.int32)
    if settings.sliding_window is not None:
      lo_bt = jnp.maximum(p_bt - settings.sliding_window + 1, 0)
    else:
      lo_bt = jnp.zeros((b, t), jnp.int32)
    self.row_lo = pad_axis(lo_bt, 1, t_pad, s_pad)
    self.row_hi = pad_axis(hi_bt, 1, t_pad, -1)
    self.q_pos = self.q_seg = self.kv_seg = self.slopes = None
    if arrays['alibi_slopes'] is not None:
      self.q_pos = pad_axis(p_bt, 1, t_pad, 0)
      self.slopes = jnp.asarray(arrays['alibi_slopes'], jnp.float32) * LOG2_E
    if arrays['segment_ids'] is not None:
      q_seg, kv_seg = arrays['segment_ids']
      self.q_seg = pad_axis(jnp.asarray(q_seg, jnp.int32), 1, t_pad, 0)
      self.kv_seg = pad_axis(jnp.asarray(kv_seg, jnp.int32), 1, s_pad, 0)

  def key_blocks(self, block_q: int, block_k: int):
    """[first, last) key blocks each query block can see: two int32 [B, n_q]."""
    b = self.row_lo.shape[0]
    n_k = self.s_pad // block_k
    empty = self.row_lo > self.row_hi
    lo = jnp.where(empty, self.s_pad, self.row_lo).reshape(b, -1, block_q).min(-1)
    hi = jnp.where(empty, -1, self.row_hi).reshape(b, -1, block_q).max(-1)
    first = jnp.clip(lo // block_k, 0, n_k)
    last = jnp.clip(hi // block_k + 1, 0, n_k)
    return first, jnp.maximum(first, last)

  def query_blocks(self, block_q: int, block_k: int):
    """[first, last) query blocks that can see each key block: two int32 [B, n_k]."""
    b = self.row_lo.shape[0]
    n_q = self.t_pad // block_q
    keys = jnp.arange(self.s, dtype=jnp.int32)
    # Rows seeing key j are those with hi >= j and lo <= j: a contiguous run, as both ends
    # are non-decreasing over the rows.
    search = jax.vmap(jnp.searchsorted, in_axes=(0, None, None))
    start = search(self.row_hi[:, :self.t], keys, 'left').astype(jnp.int32)
    stop = search(self.row_lo[:, :self.t], keys, 'right').astype(jnp.int32)
    seen = start < stop
    first_row = pad_axis(jnp.where(seen, start, self.t_pad), 1, self.s_pad, self.t_pad)
    last_row = pad_axis(jnp.where(seen, stop - 1, -1), 1, self.s_pad, -1)
    first = jnp.clip(first_row.reshape(b, -1, block_k).min(-1) // block_q, 0, n_q)
    last = jnp.clip(last_row.reshape(b, -1, block_k).max(-1) // block_q + 1, 0, n_q)
    return first, jnp.maximum(first, last)


def pad_axis(x, axis: int, length: int, value):
  """x padded with `value` at the end of `axis` to `length`."""
  widths = [(0, 0)] * x.ndim
  widths[axis] = (0, length - x.shape[axis])
  return jnp.pad(x, widths, constant_values=value)


def block_logits(qk, k_pos, lo, hi, *, scale, causal, q_pos=None, slope=None, q_seg=None,
                 kv_seg=None):
  """One block's logits in bits: (q.k * scale + ALiBi) * log2(e), -inf where hidden.

  qk: [bq, bk] float32 dot products. k_pos and kv_seg broadcast as [1, bk]; lo, hi, q_pos,
  q_seg as [bq, 1] (or are already [bq, bk]). slope: the head's ALiBi slope in bits.
  """
  logits = qk * (scale * LOG2_E)
  if slope is not None:
    distance = (q_pos - k_pos).astype(jnp.float32)
    if not causal:
      distance = jnp.abs(distance)
    logits = logits - slope * distance
  visible = (k_pos >= lo) & (k_pos <= hi)
  if q_seg is not None:
    visible = visible & (q_seg == kv_seg)
  return jnp.where(visible, logits, -jnp.inf)


def softmax_grad(logits, lse, dp, delta, scale):
  """(probabilities, d logits in natural units) of one block, from the saved lse in bits."""
  probs = jnp.exp2(logits - lse)
  return probs, probs * (dp - delta) * scale


def dot_nt(a, b):
  """a @ b.T with float32 accumulation."""
  return jax.lax.dot_general(a, b, (((1,), (1,)), ((), ())), preferred_element_type=jnp.float32)


def dot_nn(a, b):
  return jax.lax.dot_general(a, b, (((1,), (0,)), ((), ())), preferred_element_type=jnp.float32)


def dot_tn(a, b):
  """a.T @ b with float32 accumulation."""
  return jax.lax.dot_general(a, b, (((0,), (0,)), ((), ())), preferred_element_type=jnp.float32)


def call(kernel, *, grid, inputs, outputs, settings: Settings, name: str, interpret,
         compiler_params=None, scalars=None, scratch=None):
  """pl.pallas_call with named operands: `kernel(**refs)` gets one keyword per name.

  inputs: {name: (array, BlockSpec)}; outputs: {name: (ShapeDtypeStruct, BlockSpec)};
  scalars: {name: int/float array} prefetched to scalar memory (TPU: the index maps get
  them as trailing arguments); scratch: {name: scratch shape}. With settings.poison each
  output starts as a NaN-filled buffer aliased to it.
  """
  scalars, scratch = scalars or {}, scratch or {}
  in_names, out_names = list(inputs), list(outputs)
  arrays = [array for array, _ in inputs.values()]
  in_specs = [spec for _, spec in inputs.values()]
  aliases = {}
  if settings.poison:
    for k, (shape, spec) in enumerate(outputs.values()):
      aliases[len(scalars) + len(arrays)] = k
      arrays.append(jnp.full(shape.shape, jnp.nan, shape.dtype))
      in_specs.append(spec)
  n_in = len(arrays)

  def body(*refs):
    named = dict(zip(list(scalars), refs[:len(scalars)]))
    refs = refs[len(scalars):]
    named.update(zip(in_names, refs[:len(in_names)]))
    refs = refs[n_in:]
    named.update(zip(out_names, refs[:len(out_names)]))
    named.update(zip(scratch, refs[len(out_names):]))
    kernel(**named)

  out_shapes = [shape for shape, _ in outputs.values()]
  out_specs = [spec for _, spec in outputs.values()]
  if scalars or scratch:
    from jax.experimental.pallas import tpu as pltpu
    grid_spec = pltpu.PrefetchScalarGridSpec(
        num_scalar_prefetch=len(scalars), grid=grid, in_specs=in_specs, out_specs=out_specs,
        scratch_shapes=list(scratch.values()))
    specs = dict(grid_spec=grid_spec)
  else:
    specs = dict(grid=grid, in_specs=in_specs, out_specs=out_specs)
  return pl.pallas_call(body, out_shape=out_shapes, input_output_aliases=aliases,
                        interpret=interpret, compiler_params=compiler_params, name=name,
                        **specs)(*scalars.values(), *arrays)
