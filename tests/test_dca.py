"""Dual Chunk Attention against plain RoPE attention and a direct reading of its definition.

The oracle scores every (query i, key j <= i) pair on its own: it picks the pair's position
pair (P_q, P_k) from An et al. 2024 in Qwen's chunk_size/local_size terms (see models/dca.py),
rotates q_i and k_j there with a numpy RoPE written here, and takes a softmax over j.
"""
import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from lmlab.kernels import attention as attention_lib
from conftest import small_config
from lmlab.models.errors import ConfigError
from lmlab.models.dca import dual_chunk_attention
from lmlab.models.decoder import DecoderLM
from lmlab.models.positions import RotaryPositions

HEAD_DIM = 8
THETA = 10000.0


def rotation_at(positions_bt):
  return RotaryPositions(small_config(head_dim=HEAD_DIM, rope_theta=THETA)).rotation(
      positions_bt)


def dca(q, k, v, *, chunk_size, local_size, scale, block_q=256, **arrays):
  """dual_chunk_attention, jitted (its block loop is slow to run eagerly)."""
  run = jax.jit(lambda q, k, v, arrays: dual_chunk_attention(
      q, k, v, rotation_at=rotation_at, chunk_size=chunk_size, local_size=local_size,
      scale=scale, block_q=block_q, **arrays))
  return run(q, k, v, arrays)


def rope(x_d, position):
  """RoPE of one vector, rotate-half pairs (x[m], x[m + D/2]) at angle position * theta^(-2m/D)."""
  half = x_d.shape[-1] // 2
  angle = position * THETA ** (-np.arange(half) * 2.0 / x_d.shape[-1])
  x1, x2 = x_d[:half], x_d[half:]
  return np.concatenate([x1 * np.cos(angle) - x2 * np.sin(angle),
                         x2 * np.cos(angle) + x1 * np.sin(angle)])


def position_pair(i, j, chunk_size, local_size):
  """(P_q, P_k) of query position i against key position j <= i."""
  s = chunk_size - local_size
  gap = i // s - j // s
  if gap == 0:
    p_q = i % s
  elif gap == 1:
    p_q = min(s + i % s, chunk_size)
  else:
    p_q = chunk_size
  return p_q, j % s


def direct_dca(q, k, v, *, chunk_size, local_size, scale, q_positions, k_positions):
  b, t, hq, _ = q.shape
  groups = hq // k.shape[2]
  out = np.zeros(q.shape)
  for bi in range(b):
    for h in range(hq):
      kv_head = h // groups
      for i in range(t):
        scores, values = [], []
        for j in range(k.shape[1]):
          if k_positions[j] > q_positions[i]:
            continue
          p_q, p_k = position_pair(q_positions[i], k_positions[j], chunk_size, local_size)
          scores.append(rope(q[bi, i, h], p_q) @ rope(k[bi, j, kv_head], p_k) * scale)
          values.append(v[bi, j, kv_head])
        weights = np.exp(np.array(scores) - max(scores))
        out[bi, i, h] = weights @ np.array(values) / weights.sum()
  return out


def random_qkv(rng, b, t, s, hq, hkv):
  normal = lambda *shape: jnp.asarray(rng.normal(size=shape), jnp.float32)
  return normal(b, t, hq, HEAD_DIM), normal(b, s, hkv, HEAD_DIM), normal(b, s, hkv, HEAD_DIM)


def random_sizes(rng):
  chunk_size = int(rng.integers(4, 12))
  return chunk_size, int(rng.integers(0, (chunk_size - 1) // 2 + 1))


@pytest.mark.parametrize('hq,hkv', [(4, 4), (4, 2), (6, 1)])
def test_equals_plain_rope_attention_up_to_chunk_size(hq, hkv, rng):
  chunk_size, local_size = random_sizes(rng)
  t = int(rng.integers(1, chunk_size + 1))
  q, k, v = random_qkv(rng, 2, t, t, hq, hkv)
  out = dca(q, k, v, chunk_size=chunk_size, local_size=local_size, scale=0.4,
            block_q=int(rng.integers(1, t + 1)))
  rotate = rotation_at(jnp.broadcast_to(jnp.arange(t), (2, t)))
  plain = attention_lib.attention(rotate(q), rotate(k), v, causal=True, scale=0.4, impl='xla')
  np.testing.assert_allclose(np.asarray(out), np.asarray(plain), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize('hq,hkv', [(2, 2), (4, 2), (3, 1)])
def test_equals_direct_definition_over_several_chunks(hq, hkv, rng):
  chunk_size, local_size = random_sizes(rng)
  t = int(rng.integers(3, 5)) * (chunk_size - local_size) + int(rng.integers(0, 4))
  q, k, v = random_qkv(rng, 2, t, t, hq, hkv)
  out = dca(q, k, v, chunk_size=chunk_size, local_size=local_size, scale=0.5,
            block_q=int(rng.integers(1, t + 1)))
  positions = np.arange(t)
  expected = direct_dca(np.asarray(q), np.asarray(k), np.asarray(v), chunk_size=chunk_size,
                        local_size=local_size, scale=0.5, q_positions=positions,
                        k_positions=positions)
  np.testing.assert_allclose(np.asarray(out), expected, rtol=1e-4, atol=1e-5)
  rotate = rotation_at(jnp.broadcast_to(jnp.arange(t), (2, t)))
  plain = attention_lib.attention(rotate(q), rotate(k), v, causal=True, scale=0.5, impl='xla')
  assert not np.allclose(np.asarray(plain), expected, atol=1e-3)  # The mapping matters here.


def test_queries_at_an_offset_as_in_decoding(rng):
  """A few consecutive positions queried against all keys of the sequence (a KV cache)."""
  chunk_size, local_size = random_sizes(rng)
  s = 3 * chunk_size
  t = int(rng.integers(1, 4))
  q, k, v = random_qkv(rng, 1, t, s, 4, 2)
  last = int(rng.integers(t - 1, s))  # Keys after it stand for cache slots not yet written.
  q_positions = np.arange(last - t + 1, last + 1)
  out = dca(q, k, v, chunk_size=chunk_size, local_size=local_size, scale=0.5,
            q_positions_bt=jnp.asarray(q_positions)[None])
  expected = direct_dca(np.asarray(q), np.asarray(k), np.asarray(v), chunk_size=chunk_size,
                        local_size=local_size, scale=0.5, q_positions=q_positions,
                        k_positions=np.arange(s))
  np.testing.assert_allclose(np.asarray(out), expected, rtol=1e-4, atol=1e-5)


def test_packed_documents_equal_each_document_alone(rng):
  chunk_size, local_size = random_sizes(rng)
  lengths = [int(n) for n in rng.integers(1, 3 * chunk_size, 3)]
  q, k, v = random_qkv(rng, 1, sum(lengths), sum(lengths), 4, 2)
  segments = jnp.concatenate([jnp.full((1, n), i) for i, n in enumerate(lengths)], axis=1)
  positions = jnp.concatenate([jnp.arange(n)[None] for n in lengths], axis=1)
  sizes = dict(chunk_size=chunk_size, local_size=local_size, scale=0.5)
  packed = dca(q, k, v, q_positions_bt=positions, k_positions_bs=positions,
               segment_ids=(segments, segments), **sizes)
  bounds = np.cumsum([0] + lengths)
  alone = jnp.concatenate([dca(q[:, a:z], k[:, a:z], v[:, a:z], **sizes)
                           for a, z in zip(bounds[:-1], bounds[1:])], axis=1)
  np.testing.assert_allclose(np.asarray(packed), np.asarray(alone), rtol=1e-5, atol=1e-5)


def build(config, seed):
  """The model's forward pass and cached decoding, each jitted (eager decoding is slow)."""
  graphdef, state = nnx.split(DecoderLM(config, rngs=nnx.Rngs(seed)))
  forward = jax.jit(lambda state, tokens: nnx.merge(graphdef, state)(tokens))
  decode = jax.jit(lambda state, *args: nnx.merge(graphdef, state).decode(*args))
  init_cache = nnx.merge(graphdef, state).init_cache
  return functools.partial(forward, state), functools.partial(decode, state), init_cache


def test_decoder_logits_equal_plain_within_chunk_size_and_finite_beyond(rng):
  chunk_size = 12
  config = small_config()
  dca_config = dataclasses.replace(config, dca_chunk_size=chunk_size, dca_local_size=3).validate()
  seed = int(rng.integers(1 << 30))
  (plain, _, _), (with_dca, _, _) = build(config, seed), build(dca_config, seed)
  tokens = jnp.asarray(rng.integers(0, config.vocab_size, (2, 4 * chunk_size)), jnp.int32)
  within = int(rng.integers(1, chunk_size + 1))
  np.testing.assert_allclose(np.asarray(with_dca(tokens[:, :within])),
                             np.asarray(plain(tokens[:, :within])), rtol=1e-5, atol=1e-5)
  beyond = np.asarray(with_dca(tokens))
  assert np.all(np.isfinite(beyond))
  # Causal: the first chunk_size positions see only the first chunk_size tokens.
  np.testing.assert_allclose(beyond[:, :chunk_size], np.asarray(plain(tokens))[:, :chunk_size],
                             rtol=1e-5, atol=1e-5)


def test_decoder_cached_decoding_equals_full_forward(rng):
  config = small_config(dca_chunk_size=8, dca_local_size=2, n_kv_heads=1)
  forward, decode, init_cache = build(config, int(rng.integers(1 << 30)))
  t = 30
  tokens = jnp.asarray(rng.integers(0, config.vocab_size, (2, t)), jnp.int32)
  full = forward(tokens)
  prefill = int(rng.integers(1, t))
  logits, caches = decode(tokens[:, :prefill], init_cache(2, t + 2), 0)
  steps = [logits]
  for i in range(prefill, t):
    logits, caches = decode(tokens[:, i:i + 1], caches, i)
    steps.append(logits)
  np.testing.assert_allclose(np.asarray(jnp.concatenate(steps, axis=1)), np.asarray(full),
                             rtol=1e-5, atol=1e-5)


def test_decoder_remat_changes_nothing(rng):
  config = small_config(dca_chunk_size=8, dca_local_size=3)
  seed = int(rng.integers(1 << 30))
  tokens = jnp.asarray(rng.integers(0, config.vocab_size, (1, 20)), jnp.int32)
  remat = build(dataclasses.replace(config, remat='full'), seed)[0]
  np.testing.assert_allclose(np.asarray(remat(tokens)), np.asarray(build(config, seed)[0](tokens)),
                             rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize('fields,message', [
    (dict(position='alibi'), 'needs position=rope'),
    (dict(position='learned'), 'needs position=rope'),
    (dict(dca_local_size=8), 'less than half of dca_chunk_size'),
    (dict(dca_local_size=20), 'less than half of dca_chunk_size'),
    (dict(sliding_window=4), 'cannot be combined'),
    (dict(dca_chunk_size=0, dca_local_size=2), 'needs dca_chunk_size > 0'),
    (dict(dca_chunk_size=-1), 'must be >= 0'),
    (dict(attention_type='mla', kv_lora_rank=8, qk_rope_head_dim=4, qk_nope_head_dim=4,
          v_head_dim=8), 'not implemented for attention_type=mla')])
def test_config_errors(fields, message):
  with pytest.raises(ConfigError, match=message):
    small_config(**{'dca_chunk_size': 16, 'dca_local_size': 2, **fields})


def test_prefix_lm_is_refused(rng):
  model = DecoderLM(small_config(dca_chunk_size=8, dca_local_size=2), rngs=nnx.Rngs(0))
  tokens = jnp.asarray(rng.integers(0, 61, (1, 6)), jnp.int32)
  with pytest.raises(ConfigError, match='prefix'):
    model(tokens, prefix_len_b=jnp.array([3]))
