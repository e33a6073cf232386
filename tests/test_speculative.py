"""Speculative decoding (models/speculative.py) against the target decoding alone: greedy output
token for token, and sampled output distributed as the target's own sampling distribution
(a chi-squared test over many draws on a few-token vocabulary); and its refusals."""
import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from conftest import small_config
from lmlab.models import registry
from lmlab.models.errors import ConfigError
from lmlab.models.generation import SamplingConfig, make_generate
from lmlab.models.speculative import make_speculative_generate
from lmlab.training.language_modeling import check_same_vocabulary


def models(rng, init_std=0.02):
  """(target, draft): decoders of one vocabulary, the draft smaller, random weights."""
  seed = int(rng.integers(1 << 30))
  target = registry.build(small_config(init_std=init_std), rngs=nnx.Rngs(seed))
  draft = registry.build(small_config(n_layers=1, d_model=16, n_heads=2, n_kv_heads=1,
                                      ffn_dim=24, init_std=init_std), rngs=nnx.Rngs(seed + 1))
  return target, draft


def test_greedy_output_is_the_targets(rng):
  target, draft = models(rng, init_std=0.2)
  sampling = SamplingConfig(max_new_tokens=12, temperature=0.0)
  prompt_1t = jnp.asarray(rng.integers(0, 61, (1, int(rng.integers(1, 6)))), jnp.int32)
  end_token = int(rng.integers(0, 61))
  key = jax.random.key(int(rng.integers(1 << 30)))
  plain = make_generate(nnx.graphdef(target), sampling, end_token=end_token, n_valid=61)(
      nnx.state(target), prompt_1t, key)
  for gamma, proposer in [(int(rng.integers(1, 5)), draft), (3, target)]:
    generate = make_speculative_generate(nnx.graphdef(target), nnx.graphdef(proposer), sampling,
                                         gamma=gamma, end_token=end_token, n_valid=61)
    tokens, rounds, accepted = generate(nnx.state(target), nnx.state(proposer), prompt_1t, key)
    # Where two logits of the target's path tie within rounding, the two ways of batching
    # its forward passes may pick either; such a path is not a test of the rule.
    top2 = jax.lax.top_k(target(jnp.concatenate([prompt_1t, plain], axis=1))[0], 2)[0]
    if float(jnp.min(top2[:, 0] - top2[:, 1])) > 1e-4:
      np.testing.assert_array_equal(tokens, plain)
    if proposer is target:  # A draft that is the target has every token accepted.
      assert int(accepted) == int(rounds) * gamma or end_token in plain.tolist()[0]


def joint_probs(target, prompt_1t, n_valid, n_new, temperature, top_k):
  """The target's probability of each sequence of n_new tokens below n_valid, from full
  forward passes, with temperature and top-k applied as plain sampling does."""
  sequences = np.array(list(itertools.product(range(n_valid), repeat=n_new)), np.int32)
  t = prompt_1t.shape[1]
  full = jnp.concatenate([jnp.repeat(prompt_1t, len(sequences), 0), sequences], axis=1)
  logits = target(full)[:, t - 1:t - 1 + n_new, :n_valid] / temperature
  if top_k:
    kth = jnp.sort(logits, axis=-1)[..., -top_k][..., None]
    logits = jnp.where(logits < kth, -jnp.inf, logits)
  step_probs = jax.nn.softmax(logits, axis=-1)
  chosen = jnp.take_along_axis(step_probs, sequences[..., None], axis=-1)[..., 0]
  return sequences, np.asarray(jnp.prod(chosen, axis=1), np.float64)


@pytest.mark.parametrize('temperature,top_k', [(1.0, 0), (0.7, 3)])
def test_samples_are_distributed_as_the_targets(temperature, top_k, rng):
  target, draft = models(rng, init_std=0.5)
  n_valid, n_new, draws = 5, 3, 20000
  sampling = SamplingConfig(max_new_tokens=n_new, temperature=temperature, top_k=top_k)
  prompt_1t = jnp.asarray(rng.integers(0, n_valid, (1, 3)), jnp.int32)
  generate = make_speculative_generate(nnx.graphdef(target), nnx.graphdef(draft), sampling,
                                       gamma=2, end_token=60, n_valid=n_valid)
  keys = jax.random.split(jax.random.key(int(rng.integers(1 << 30))), draws)
  tokens, rounds, accepted = jax.vmap(generate, in_axes=(None, None, None, 0))(
      nnx.state(target), nnx.state(draft), prompt_1t, keys)
  sequences, probs = joint_probs(target, prompt_1t, n_valid, n_new, temperature, top_k)
  index = {tuple(s): i for i, s in enumerate(sequences.tolist())}
  counts = np.bincount([index[tuple(row)] for row in np.asarray(tokens)[:, 0].tolist()],
                       minlength=len(sequences))
  expected = probs * draws
  # Cells expected fewer than 5 times are pooled, as the test's approximation needs.
  small = expected < 5
  observed = np.append(counts[~small], counts[small].sum())
  wanted = np.append(expected[~small], expected[small].sum())
  observed, wanted = observed[wanted > 0], wanted[wanted > 0]
  chi2 = float(np.sum((observed - wanted) ** 2 / wanted))
  p_value = float(jax.scipy.special.gammaincc((len(wanted) - 1) / 2, chi2 / 2))
  assert p_value > 1e-4, (chi2, len(wanted))
  # The draft is not the target: some of its tokens are rejected, and some kept.
  assert 0 < int(accepted.sum()) < int(rounds.sum()) * 2


def test_refusals():
  target, draft = small_config(), small_config(vocab_size=67)
  with pytest.raises(ConfigError, match='another tokenizer or vocabulary'):
    check_same_vocabulary(target, draft, FakeTokenizer(61), FakeTokenizer(61), 'runs/d')
  with pytest.raises(ConfigError, match='another tokenizer or vocabulary'):
    check_same_vocabulary(target, target, FakeTokenizer(61), FakeTokenizer(61, shift=1),
                          'runs/d')
  check_same_vocabulary(target, target, FakeTokenizer(61), FakeTokenizer(61), 'runs/d')
  with pytest.raises(ConfigError, match='repetition_penalty'):
    make_speculative_generate(None, None, SamplingConfig(repetition_penalty=1.2), gamma=2,
                              end_token=0, n_valid=61)


class FakeTokenizer:
  """Token i is the bytes of i + shift."""

  def __init__(self, n_vocab, shift=0):
    self.n_vocab, self.shift = n_vocab, shift

  def decode_single_token_bytes(self, token):
    return str(token + self.shift).encode()
