"""Pallas flash attention: the mask as O(T + S) vectors, its evaluation on a block, dispatch.

Every visibility rule of docs/DESIGN.md (causal, sliding window, prefix-LM, with the query
offset) leaves each query row an interval of visible keys, lo <= j <= hi, whose ends never
decrease from one row to the next; segment ids then remove keys inside it. So the mask
travels to the kernels as per-row vectors (lo, hi, the row's position for ALiBi, its segment)
and per-key segments, never as a [T, S] tensor, and the key blocks that a query block can
see at all (and the query blocks that can see a key block) are ranges computed from the same
intervals, so fully hidden blocks are skipped.

The kernels themselves live in pallas_gpu.py (Triton lowering) and pallas_tpu.py (Mosaic);
both evaluate a block with `block_logits` and work in base-2 exponents: logits are
multiplied by log2(e), and the saved log-sum-exp is in bits. A row with no visible key gets
log-sum-exp +inf, which makes its probabilities, output and gradients exactly zero.
"""
import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import pallas as pl

from lmlab.kernels import reference

LOG2_E = math.log2(math.e)
DTYPES = (jnp.float32, jnp.bfloat16, jnp.float16)
MAX_HEAD_DIM = 256


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
    self.row_lo = _pad_axis(lo_bt, 1, t_pad, s_pad)
    self.row_hi = _pad_axis(hi_bt, 1, t_pad, -1)
    self.q_pos = self.q_seg = self.kv_seg = self.slopes = None
    if arrays['alibi_slopes'] is not None:
      self.q_pos = _pad_axis(p_bt, 1, t_pad, 0)
      self.slopes = jnp.asarray(arrays['alibi_slopes'], jnp.float32) * LOG2_E
    if arrays['segment_ids'] is not None:
      q_seg, kv_seg = arrays['segment_ids']
      self.q_seg = _pad_axis(jnp.asarray(q_seg, jnp.int32), 1, t_pad, 0)
      self.kv_seg = _pad_axis(jnp.asarray(kv_seg, jnp.int32), 1, s_pad, 0)

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
    first_row = _pad_axis(jnp.where(seen, start, self.t_pad), 1, self.s_pad, self.t_pad)
    last_row = _pad_axis(jnp.where(seen, stop - 1, -1), 1, self.s_pad, -1)
    first = jnp.clip(first_row.reshape(b, -1, block_k).min(-1) // block_q, 0, n_q)
    last = jnp.clip(last_row.reshape(b, -1, block_k).max(-1) // block_q + 1, 0, n_q)
    return first, jnp.maximum(first, last)


def _pad_axis(x, axis: int, length: int, value):
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


def _variant(name: str):
  if name == 'gpu':
    from lmlab.kernels import pallas_gpu
    return pallas_gpu
  from lmlab.kernels import pallas_tpu
  return pallas_tpu


def _padded(x, length: int, head_dim: int):
  """Zero-pad [B, L, H, D] to [B, length, H, head_dim]."""
  return jnp.pad(x, ((0, 0), (0, length - x.shape[1]), (0, 0), (0, head_dim - x.shape[3])))


def _problem(q, k, arrays, settings: Settings):
  """(variant module, mask, T_pad, S_pad, D_pad) of one call."""
  b, t, _, d = q.shape
  s = k.shape[1]
  blocks = settings.blocks
  # Block sizes are powers of two, so the largest is a multiple of the others.
  t_block = max(blocks.q, blocks.q_dkv, blocks.q_dq)
  s_block = max(blocks.k, blocks.k_dkv, blocks.k_dq)
  t_pad, s_pad = -(-t // t_block) * t_block, -(-s // s_block) * s_block
  variant = _variant(settings.variant)
  mask = Mask(arrays, settings, b=b, t=t, s=s, t_pad=t_pad, s_pad=s_pad)
  return variant, mask, t_pad, s_pad, variant.padded_head_dim(d)


def _forward(q, k, v, arrays, settings):
  variant, mask, t_pad, s_pad, d_pad = _problem(q, k, arrays, settings)
  out, lse = variant.forward(_padded(q, t_pad, d_pad), _padded(k, s_pad, d_pad),
                             _padded(v, s_pad, d_pad), mask, settings)
  return out[:, :q.shape[1], :, :q.shape[3]], lse


@functools.partial(jax.custom_vjp, nondiff_argnums=(4,))
def _attention(q, k, v, arrays, settings):
  return _forward(q, k, v, arrays, settings)[0]


def _attention_fwd(q, k, v, arrays, settings):
  out, lse = _forward(q, k, v, arrays, settings)
  return out, (q, k, v, arrays, out, lse)


def _attention_bwd(settings, residuals, d_out):
  q, k, v, arrays, out, lse = residuals
  t, d, s = q.shape[1], q.shape[3], k.shape[1]
  variant, mask, t_pad, s_pad, d_pad = _problem(q, k, arrays, settings)
  # delta_i = sum_d dO_i * O_i, the row term of the softmax gradient.
  delta_bht = jnp.einsum('bthd,bthd->bht', d_out.astype(jnp.float32), out.astype(jnp.float32))
  dq, dk, dv = variant.backward(
      _padded(q, t_pad, d_pad), _padded(k, s_pad, d_pad), _padded(v, s_pad, d_pad),
      _padded(d_out, t_pad, d_pad), lse, _pad_axis(delta_bht, 2, t_pad, 0.0), mask, settings)
  return dq[:, :t, :, :d], dk[:, :s, :, :d], dv[:, :s, :, :d], None


_attention.defvjp(_attention_fwd, _attention_bwd)


def default_variant() -> str:
  return 'tpu' if jax.default_backend() == 'tpu' else 'gpu'


def unsupported(q, k) -> str | None:
  """Why the Pallas kernels cannot run this request, or None when they can."""
  if q.dtype not in DTYPES or k.dtype != q.dtype:
    return f'dtypes q={q.dtype} k={k.dtype}; supported: float32, bfloat16, float16, all alike'
  if q.shape[-1] > MAX_HEAD_DIM:
    return f'head_dim {q.shape[-1]} > {MAX_HEAD_DIM}'
  return None


@functools.lru_cache(maxsize=None)
def runs_here(dtype, head_dim: int) -> bool:
  """Whether the kernels compile, run and agree with the reference on the default backend.

  impl='auto' picks Pallas only where this holds, so a kernel that some JAX version or
  accelerator fails to compile costs speed, never a crash. Tried once per (dtype,
  head_dim) on a small problem with every mask feature, causal and not; compiled ahead of
  time and run on concrete arrays, so it also works while a caller is being traced.
  """
  # Long enough for the full default blocks: a real run's blocks, and its shared memory.
  b, t, s, hq, hkv = 2, 130, 200, 4, 2
  rng = np.random.default_rng(0)
  q = rng.standard_normal((b, t, hq, head_dim)).astype(dtype)
  k, v = rng.standard_normal((2, b, s, hkv, head_dim)).astype(dtype)
  d_out = rng.standard_normal(q.shape).astype(np.float32)
  segments = np.arange(s)[None].repeat(b, 0) // 30
  mask = dict(sliding_window=50, segment_ids=(segments[:, s - t:], segments),
              prefix_len=np.array([10, 50]), alibi_slopes=np.linspace(0.1, 1.0, hq),
              scale=head_dim ** -0.5, q_offset=s - t)
  tolerance = 1e-3 if dtype == jnp.float32 else 5e-2
  try:
    for causal in (True, False):
      results = []
      for impl in (attention, reference.attention):
        loss = lambda q, k, v: jnp.sum(impl(q, k, v, causal=causal, **mask) * d_out)
        step = jax.jit(jax.value_and_grad(loss, (0, 1, 2))).trace(q, k, v).lower().compile()
        results.append([np.asarray(x, np.float32) for x in jax.tree.leaves(step(q, k, v))])
      for got, expected in zip(*results):
        if not np.max(np.abs(got - expected)) <= tolerance * (1 + np.max(np.abs(expected))):
          return False
  except Exception:  # Whatever fails to lower, compile or run: not on this backend.
    return False
  return True


def attention(q, k, v, *, causal, sliding_window, segment_ids, prefix_len, alibi_slopes, scale,
              q_offset, blocks: BlockSizes | int | None = None, variant: str | None = None,
              interpret: bool | None = None, poison: bool = False):
  """Pallas flash attention; the signature of reference.attention plus kernel options.

  blocks: BlockSizes, one size for all, or None for the variant's defaults.
  variant: 'gpu' (Triton) or 'tpu' (Mosaic); default by backend ('gpu' on CPU).
  interpret: run in Pallas interpret mode; default unless the backend is the variant's.
  poison: NaN-fill every kernel output before the run (for tests).
  """
  reason = unsupported(q, k)
  if reason:
    raise ValueError(f'pallas attention: {reason}')
  variant = variant or default_variant()
  if variant not in ('gpu', 'tpu'):
    raise ValueError(f"pallas attention: variant {variant!r} is not 'gpu' or 'tpu'")
  if interpret is None:
    interpret = jax.default_backend() != variant
  module = _variant(variant)
  if blocks is None:
    blocks = module.default_blocks(q.shape[-1])
  elif isinstance(blocks, int):
    blocks = BlockSizes.uniform(blocks)
  blocks = blocks.fitted(q.shape[1], k.shape[1], module.MIN_BLOCK)
  if any(size < 1 or size & (size - 1) for size in dataclasses.astuple(blocks)):
    raise ValueError(f'pallas attention: block sizes must be powers of two, got {blocks}')
  settings = Settings(bool(causal), None if sliding_window is None else int(sliding_window),
                      float(scale), blocks, variant, bool(interpret), bool(poison))
  arrays = dict(segment_ids=segment_ids, prefix_len=prefix_len, alibi_slopes=alibi_slopes,
                q_offset=q_offset)
  return _attention(q, k, v, arrays, settings)
