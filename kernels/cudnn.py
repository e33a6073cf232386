"""cuDNN's fused attention, through jax.nn.dot_product_attention(implementation='cudnn').

For comparison with the Pallas kernels. It covers what cuDNN expresses without a [T, S]
tensor: full or causal attention (causal rows aligned at the top, so q_offset must be 0),
a causal sliding window, GQA/MQA, in bfloat16 or float16 with head_dim a multiple of 8 up
to 128 (256 on Hopper and later). Everything else raises ValueError saying why.
"""
import jax
import jax.numpy as jnp
import numpy as np


def _is_zero(q_offset) -> bool:
  try:
    return not np.any(np.asarray(q_offset))
  except jax.errors.TracerArrayConversionError:
    return False


def unsupported(q, k, *, causal, sliding_window, segment_ids, prefix_len, alibi_slopes,
                q_offset) -> str | None:
  """Why cuDNN cannot run this request, or None when it can."""
  if segment_ids is not None:
    return 'segment ids are not supported'
  if prefix_len is not None:
    return 'prefix-LM (prefix_len) is not supported'
  if alibi_slopes is not None:
    return 'ALiBi would need a [T, S] bias tensor; not supported'
  if sliding_window is not None and not causal:
    return 'a sliding window needs causal=True'
  if sliding_window is not None and sliding_window < 1:
    return f'sliding_window={sliding_window} leaves no key visible'
  if (causal or sliding_window is not None) and not _is_zero(q_offset):
    return 'masks are aligned at row 0; q_offset must be a concrete 0'
  if q.dtype not in (jnp.bfloat16, jnp.float16) or k.dtype != q.dtype:
    return f'dtype {q.dtype} (cuDNN takes bfloat16 or float16)'
  if q.shape[-1] % 8 or q.shape[-1] > 256:
    return f'head_dim {q.shape[-1]} (cuDNN takes multiples of 8 up to 256)'
  if jax.default_backend() != 'gpu':
    return f'needs a CUDA GPU; the backend is {jax.default_backend()}'
  return None


def attention(q, k, v, *, causal, sliding_window, segment_ids, prefix_len, alibi_slopes, scale,
              q_offset):
  reason = unsupported(q, k, causal=causal, sliding_window=sliding_window,
                       segment_ids=segment_ids, prefix_len=prefix_len, alibi_slopes=alibi_slopes,
                       q_offset=q_offset)
  if reason:
    raise ValueError(f'cudnn attention: {reason}')
  # jax's window is (keys before, keys after); ours counts the query's own key.
  window = None if sliding_window is None else (sliding_window - 1, 0)
  try:
    return jax.nn.dot_product_attention(q, k, v, scale=scale, is_causal=causal,
                                        local_window_size=window, implementation='cudnn')
  except NotImplementedError as error:  # jax's checks of cuDNN version, GPU and head_dim.
    raise ValueError(f'cudnn attention: {error}') from error
