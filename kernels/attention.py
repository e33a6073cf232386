"""Attention behind one call: `attention(q, k, v, ..., impl=...)`.

Layout [batch, seq, heads, head_dim]; k/v may have fewer heads than q (GQA/MQA).
Masks are described by arguments, never passed as tensors; see kernels/masks.py.
"""
import math

import jax

from lmlab.kernels import chunked, cudnn, pallas, reference

IMPLEMENTATIONS = {'xla': reference.attention, 'chunked': chunked.attention,
                   'pallas': pallas.attention, 'cudnn': cudnn.attention}


def auto_implementation(q=None, k=None) -> str:
  """What impl='auto' runs on the default backend (for these q and k, when given).

  On CPU the blockwise kernel is faster than materialising the scores at every length
  measured (1.2x at T=128, 4-7x at T=1024-2048, forward and backward). On GPU and TPU the
  Pallas kernels, when they take q's dtype and head_dim and have been seen to compile and
  agree with the reference on this backend (pallas.runs_here); otherwise the plain one.
  """
  if jax.default_backend() == 'cpu':
    return 'chunked'
  if q is not None and (pallas.unsupported(q, k) or not pallas.runs_here(q.dtype, q.shape[-1])):
    return 'xla'
  return 'pallas'


def attention(q, k, v, *, causal=False, sliding_window=None, segment_ids=None,
              prefix_len=None, alibi_slopes=None, scale=None, q_offset=0, impl='auto'):
  """softmax(q k^T * scale + alibi, masked) v.

  Args:
    q: [B, T, Hq, D]; k, v: [B, S, Hkv, D] with Hq % Hkv == 0.
    causal, sliding_window, prefix_len, segment_ids=(q_seg [B,T], kv_seg [B,S]),
      alibi_slopes [Hq]: the mask description of docs/DESIGN.md.
    scale: softmax scale, default 1/sqrt(D).
    q_offset: absolute position of query row 0 (int, scalar or [B] array).
    impl: 'auto' (see auto_implementation) or one of IMPLEMENTATIONS.
  Returns:
    [B, T, Hq, D] in q's dtype.
  """
  if q.ndim != 4 or k.shape != v.shape or k.shape[0] != q.shape[0] or k.shape[3] != q.shape[3]:
    raise ValueError(f'attention: bad shapes q={q.shape} k={k.shape} v={v.shape}; '
                     'expected q [B,T,Hq,D], k=v [B,S,Hkv,D]')
  if q.shape[2] % k.shape[2]:
    raise ValueError(f'attention: {q.shape[2]} query heads are not a multiple of '
                     f'{k.shape[2]} key/value heads')
  name = auto_implementation(q, k) if impl == 'auto' else impl
  if name not in IMPLEMENTATIONS:
    raise ValueError(f'attention: unknown impl {impl!r}; choose auto or one of '
                     f'{sorted(IMPLEMENTATIONS)}')
  if scale is None:
    scale = 1.0 / math.sqrt(q.shape[-1])
  return IMPLEMENTATIONS[name](
      q, k, v, causal=causal, sliding_window=sliding_window, segment_ids=segment_ids,
      prefix_len=prefix_len, alibi_slopes=alibi_slopes, scale=scale, q_offset=q_offset)
