"""Jitted cached generation against a naive loop over full forward passes, and the samplers."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from conftest import small_config
from lmlab.models.decoder import DecoderLM
from lmlab.models.generation import SamplingConfig, make_generate, next_token_logits


def naive_greedy(model, prompt, n_new, n_valid):
  """A full forward pass per new token, no cache. The buffer has a fixed length (one
  compilation); the model is causal, so the unfilled tail does not change the logits read."""
  b, t = prompt.shape
  graphdef, params = nnx.split(model)
  forward = jax.jit(lambda p, tokens: nnx.merge(graphdef, p)(tokens))
  tokens = np.zeros((b, t + n_new), np.int32)
  tokens[:, :t] = prompt
  for i in range(t, t + n_new):
    logits = np.asarray(forward(params, jnp.asarray(tokens)))[:, i - 1, :n_valid]
    tokens[:, i] = np.argmax(logits, -1)
  return tokens[:, t:]


@pytest.mark.parametrize('fields', [dict(), dict(position='learned', n_kv_heads=1)])
def test_greedy_generation_equals_naive_decoding(fields, rng):
  config = small_config(**fields)
  model = DecoderLM(config, rngs=nnx.Rngs(int(rng.integers(1 << 30))))
  prompt = jnp.asarray(rng.integers(0, 50, (2, 5)), jnp.int32)
  n_valid = config.vocab_size - 3
  generate = make_generate(*nnx.split(model)[:1], SamplingConfig(max_new_tokens=12,
                                                                  temperature=0.0),
                           end_token=config.vocab_size, n_valid=n_valid)
  got = np.asarray(generate(nnx.state(model), prompt, jax.random.key(0)))
  np.testing.assert_array_equal(got, naive_greedy(model, prompt, 12, n_valid))


def test_generation_stops_at_end_token(rng):
  config = small_config()
  model = DecoderLM(config, rngs=nnx.Rngs(int(rng.integers(1 << 30))))
  prompt = jnp.asarray(rng.integers(0, 50, (1, 4)), jnp.int32)
  expected = naive_greedy(model, prompt, 10, config.vocab_size)[0]
  stop_at = 3
  end = int(expected[stop_at])
  first = int(np.argmax(expected == end))  # The end token may come even earlier.
  graphdef, params = nnx.split(model)
  generate = make_generate(graphdef, SamplingConfig(max_new_tokens=10, temperature=0.0),
                           end_token=end, n_valid=config.vocab_size)
  got = np.asarray(generate(params, prompt, jax.random.key(0)))[0]
  np.testing.assert_array_equal(got[:first + 1], expected[:first + 1])
  assert np.all(got[first:] == end)


def test_top_k_keeps_the_k_largest(rng):
  logits = jnp.asarray(rng.standard_normal((3, 40)), jnp.float32)
  k = int(rng.integers(1, 40))
  out = np.asarray(next_token_logits(logits, None, SamplingConfig(temperature=1.0, top_k=k)))
  for row, original in zip(out, np.asarray(logits)):
    assert set(np.flatnonzero(np.isfinite(row))) == set(np.argsort(-original)[:k])


def test_top_p_keeps_the_smallest_set_reaching_p(rng):
  logits = jnp.asarray(rng.standard_normal((3, 30)) * 2, jnp.float32)
  p = float(rng.uniform(0.1, 0.95))
  temperature = float(rng.uniform(0.5, 2.0))
  out = np.asarray(next_token_logits(logits, None, SamplingConfig(temperature=temperature,
                                                                  top_p=p)))
  for row, original in zip(out, np.asarray(logits, np.float64) / temperature):
    probs = np.exp(original - original.max())
    probs /= probs.sum()
    order = np.argsort(-probs)
    n_keep = int(np.searchsorted(np.cumsum(probs[order]), p) + 1)
    assert set(np.flatnonzero(np.isfinite(row))) == set(order[:n_keep])
    kept = np.isfinite(row)
    np.testing.assert_allclose(row[kept], original[kept], rtol=1e-5)


def test_repetition_penalty_formula(rng):
  logits = rng.standard_normal((2, 20)).astype(np.float32)
  seen = rng.random((2, 20)) < 0.5
  penalty = float(rng.uniform(1.1, 2.0))
  out = np.asarray(next_token_logits(jnp.asarray(logits), jnp.asarray(seen),
                                     SamplingConfig(temperature=0.0,
                                                    repetition_penalty=penalty)))
  expected = np.where(seen, np.where(logits > 0, logits / penalty, logits * penalty), logits)
  np.testing.assert_allclose(out, expected, rtol=1e-6)


def test_sampling_follows_the_softmax(rng):
  config = small_config(n_layers=1)
  model = DecoderLM(config, rngs=nnx.Rngs(int(rng.integers(1 << 30))))
  graphdef, params = nnx.split(model)
  prompt = jnp.asarray(rng.integers(0, 50, (1, 3)), jnp.int32)
  generate = jax.jit(jax.vmap(make_generate(graphdef, SamplingConfig(max_new_tokens=1,
                                                                      temperature=1.0),
                                            end_token=-1, n_valid=config.vocab_size),
                              in_axes=(None, None, 0)))
  n = 4000
  draws = np.asarray(generate(params, prompt, jax.random.split(jax.random.key(1), n)))[:, 0, 0]
  probs = np.asarray(jax.nn.softmax(model(prompt)[0, -1]))
  counts = np.bincount(draws, minlength=config.vocab_size)
  # Every token's frequency within 5 standard deviations of its probability.
  sd = np.sqrt(probs * (1 - probs) / n)
  assert np.all(np.abs(counts / n - probs) <= 5 * sd + 1e-3)
