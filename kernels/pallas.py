"""Pallas flash attention: which kernel runs, its custom VJP, and what it cannot run.

The kernels live in pallas_gpu.py (Triton lowering) and pallas_tpu.py (Mosaic); what they
share (the mask as vectors, block evaluation, pallas_call with named operands) lives in
pallas_common.py. Here inputs are padded to whole blocks and a head_dim the variant takes,
the variant's forward and backward kernels are joined into one differentiable function, and
`runs_here` probes whether the kernels work on this backend before impl='auto' trusts them.
"""
import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np

from lmlab.kernels import pallas_gpu, pallas_tpu, reference
from lmlab.kernels.pallas_common import BlockSizes, Mask, Settings, pad_axis

DTYPES = (jnp.float32, jnp.bfloat16, jnp.float16)
MAX_HEAD_DIM = 256
VARIANTS = {'gpu': pallas_gpu, 'tpu': pallas_tpu}


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
  variant = VARIANTS[settings.variant]
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
      _padded(d_out, t_pad, d_pad), lse, pad_axis(delta_bht, 2, t_pad, 0.0), mask, settings)
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
  if variant not in VARIANTS:
    raise ValueError(f"pallas attention: variant {variant!r} is not 'gpu' or 'tpu'")
  if interpret is None:
    interpret = jax.default_backend() != variant
  module = VARIANTS[variant]
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
