"""Attention behind one call: `attention(q, k, v, ..., impl=..., partition=...)`.

Layout [batch, seq, heads, head_dim]; k/v may have fewer heads than q (GQA/MQA).
Masks are described by arguments, never passed as tensors; see kernels/masks.py.
Dispatch happens here only: impl='auto' is resolved, and on a mesh the implementations
that XLA cannot partition run shard by shard (kernels/shard.py).
"""
import dataclasses
import math
from typing import Callable

import jax

from lmlab.kernels import chunked, cudnn, pallas, reference, shard
from lmlab.kernels.shard import Partition


@dataclasses.dataclass(frozen=True)
class Implementation:
  """An attention function with reference.attention's signature. partitionable: XLA's
  partitioner splits it on a mesh like any jnp code; otherwise it is an opaque kernel that
  XLA would run whole on every device, so on a mesh it runs through shard.per_shard."""
  function: Callable
  partitionable: bool


IMPLEMENTATIONS = {'xla': Implementation(reference.attention, partitionable=True),
                   'chunked': Implementation(chunked.attention, partitionable=True),
                   'pallas': Implementation(pallas.attention, partitionable=False),
                   'cudnn': Implementation(cudnn.attention, partitionable=False)}


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
              prefix_len=None, alibi_slopes=None, scale=None, q_offset=0, impl='auto',
              partition: Partition | None = None):
  """softmax(q k^T * scale + alibi, masked) v.

  Args:
    q: [B, T, Hq, D]; k, v: [B, S, Hkv, D] with Hq % Hkv == 0.
    causal, sliding_window, prefix_len, segment_ids=(q_seg [B,T], kv_seg [B,S]),
      alibi_slopes [Hq]: the mask description of docs/DESIGN.md.
    scale: softmax scale, default 1/sqrt(D).
    q_offset: absolute position of query row 0 (int, scalar or [B] array).
    impl: 'auto' (see auto_implementation) or one of IMPLEMENTATIONS.
    partition: how q and k/v lie on a mesh, or None; an implementation that XLA cannot
      partition then runs shard by shard (one device or none: called whole).
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
  implementation = IMPLEMENTATIONS[name]
  kwargs = dict(causal=causal, sliding_window=sliding_window, segment_ids=segment_ids,
                prefix_len=prefix_len, alibi_slopes=alibi_slopes, scale=scale, q_offset=q_offset)
  if partition is None or partition.mesh.size == 1 or implementation.partitionable:
    return implementation.function(q, k, v, **kwargs)
  return shard.per_shard(implementation.function, q, k, v, partition, **kwargs)
