"""kernels/attention.py against a direct, loop-by-loop reading of docs/DESIGN.md's mask
semantics."""
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lmlab.kernels import attention as attention_lib
from lmlab.kernels import chunked, reference


def naive_attention(q, k, v, *, causal, sliding_window, segment_ids, prefix_len, alibi_slopes,
                    scale, q_offset):
  b, t, hq, d = q.shape
  s, hkv = k.shape[1], k.shape[2]
  out = np.zeros((b, t, hq, d))
  for bi in range(b):
    for h in range(hq):
      kv_head = h // (hq // hkv)
      for i in range(t):
        p = q_offset + i
        scores, values = [], []
        for j in range(s):
          ok = (j <= p) if causal else True
          if prefix_len is not None and p < prefix_len[bi] and j < prefix_len[bi]:
            ok = True
          if sliding_window is not None and not p - sliding_window < j:
            ok = False
          if segment_ids is not None and segment_ids[0][bi, i] != segment_ids[1][bi, j]:
            ok = False
          if not ok:
            continue
          score = float(np.dot(q[bi, i, h], k[bi, j, kv_head])) * scale
          if alibi_slopes is not None:
            score -= alibi_slopes[h] * (p - j if causal else abs(p - j))
          scores.append(score)
          values.append(v[bi, j, kv_head])
        if scores:
          w = np.exp(np.array(scores) - max(scores))
          out[bi, i, h] = (w[:, None] * np.array(values)).sum(0) / w.sum()
  return out


CASES = [
    dict(causal=True),
    dict(causal=False),
    dict(causal=True, sliding_window=3),
    dict(causal=True, prefix=True),
    dict(causal=True, segments=True),
    dict(causal=False, segments=True),
    dict(causal=True, alibi=True),
    dict(causal=False, alibi=True, segments=True),
    dict(causal=True, sliding_window=2, alibi=True, prefix=True),
]


def random_problem(case, hkv, rng, *, max_t=7):
  """Random q, k, v and mask arguments for one case, as numpy arrays."""
  b, hq, d = 2, 4, 8
  t = int(rng.integers(1, max_t))
  q_offset = int(rng.integers(0, 4))
  s = t + q_offset
  q = rng.standard_normal((b, t, hq, d)).astype(np.float32)
  k = rng.standard_normal((b, s, hkv, d)).astype(np.float32)
  v = rng.standard_normal((b, s, hkv, d)).astype(np.float32)
  kwargs = dict(causal=case['causal'], sliding_window=case.get('sliding_window'),
                segment_ids=None, prefix_len=None, alibi_slopes=None,
                scale=float(rng.uniform(0.1, 1.0)), q_offset=q_offset)
  if case.get('segments'):
    kv_seg = np.sort(rng.integers(0, 3, (b, s)), axis=1)
    kwargs['segment_ids'] = (kv_seg[:, q_offset:], kv_seg)
  if case.get('prefix'):
    kwargs['prefix_len'] = rng.integers(0, s + 1, (b,))
  if case.get('alibi'):
    kwargs['alibi_slopes'] = rng.uniform(0.01, 1.0, (hq,)).astype(np.float32)
  return q, k, v, kwargs


def as_jax(kwargs):
  return {k: (tuple(map(jnp.asarray, v)) if k == 'segment_ids' and v is not None else v)
          for k, v in kwargs.items()}


@pytest.mark.parametrize('case', CASES, ids=lambda c: '-'.join(sorted(map(str, c.items()))))
@pytest.mark.parametrize('impl', ['xla', 'chunked'])
def test_matches_naive(case, impl, rng):
  hkv = int(rng.choice([1, 2, 4]))  # One of the head layouts, drawn per run: MQA, GQA, MHA.
  print(f'hkv={hkv}')
  q, k, v, kwargs = random_problem(case, hkv, rng)
  expected = naive_attention(q, k, v, **kwargs)
  got = attention_lib.attention(jnp.asarray(q), jnp.asarray(k), jnp.asarray(v), impl=impl,
                          **as_jax(kwargs))
  np.testing.assert_allclose(np.asarray(got), expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize('case', CASES, ids=lambda c: '-'.join(sorted(map(str, c.items()))))
def test_chunked_gradients_match_the_reference(case, rng):
  """Blocks that do not divide T or S, several of them, and every mask kind."""
  q, k, v, kwargs = random_problem(case, int(rng.choice([1, 2, 4])), rng, max_t=12)
  blocks = dict(block_q=int(rng.integers(1, 5)), block_k=int(rng.integers(1, 5)))
  cotangent = jnp.asarray(rng.standard_normal(q.shape), jnp.float32)
  kwargs = as_jax(kwargs)

  def grads(f):
    return jax.jit(jax.grad(lambda *qkv: jnp.sum(f(*qkv) * cotangent), argnums=(0, 1, 2)))(
        jnp.asarray(q), jnp.asarray(k), jnp.asarray(v))

  expected = grads(lambda *qkv: reference.attention(*qkv, **kwargs))
  got = grads(lambda *qkv: chunked.attention(*qkv, **kwargs, **blocks))
  for name, e, g in zip('qkv', expected, got):
    np.testing.assert_allclose(np.asarray(g), np.asarray(e), rtol=1e-4, atol=1e-5,
                               err_msg=f'd{name}')


def test_row_without_visible_key_is_zero(rng):
  q = jnp.asarray(rng.standard_normal((1, 3, 2, 4)), jnp.float32)
  k = jnp.asarray(rng.standard_normal((1, 3, 2, 4)), jnp.float32)
  seg_q = jnp.asarray([[0, 1, 2]])
  seg_kv = jnp.asarray([[0, 1, 1]])  # The query in segment 2 has no key.
  for impl in ('xla', 'chunked'):
    attend = lambda q, k: attention_lib.attention(q, k, k, causal=True, segment_ids=(seg_q, seg_kv),
                                            impl=impl)
    out = jax.jit(attend)(q, k)
    assert np.all(np.asarray(out[:, 2]) == 0.0)
    assert np.all(np.isfinite(np.asarray(out)))
    dq, dk = jax.jit(jax.grad(lambda q, k: attend(q, k).sum(), argnums=(0, 1)))(q, k)
    assert np.all(np.asarray(dq[:, 2]) == 0.0) and np.all(np.isfinite(np.asarray(dk)))


def test_default_scale_is_inverse_sqrt_head_dim(rng):
  q = rng.standard_normal((1, 2, 1, 16)).astype(np.float32)
  k = rng.standard_normal((1, 2, 1, 16)).astype(np.float32)
  expected = naive_attention(q, k, k, causal=True, sliding_window=None, segment_ids=None,
                             prefix_len=None, alibi_slopes=None, scale=1 / math.sqrt(16),
                             q_offset=0)
  got = attention_lib.attention(jnp.asarray(q), jnp.asarray(k), jnp.asarray(k), causal=True)
  np.testing.assert_allclose(np.asarray(got), expected, rtol=1e-5, atol=1e-6)


def test_rejects_bad_head_counts():
  q = jnp.zeros((1, 2, 3, 4))
  k = jnp.zeros((1, 2, 2, 4))
  with pytest.raises(ValueError, match='not a multiple'):
    attention_lib.attention(q, k, k)
