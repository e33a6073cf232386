"""Shared-prefix sampling (models/shared_prefix.py): logits over a prompt cached once equal a
plain forward pass of each whole sequence, sampling with it draws the same tokens as sampling
from a prompt copied n times, and the cache (and a compiled decoding step) holds the
prompt's keys and values once."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from conftest import jit_call, jit_decode, small_config
from lmlab.models import registry, shared_prefix
from lmlab.models.cache_size import kv_cache_bytes_per_token
from lmlab.models.errors import ConfigError
from lmlab.models.generation import SamplingConfig, make_generate
from lmlab.training.memory import compiled_bytes

VARIANTS = {
    'gqa': {},
    'mqa_sliding_window': dict(n_kv_heads=1, sliding_window=5),
    'alibi_mha': dict(position='alibi', n_kv_heads=4),
    'llama_adapter': dict(peft='llama_adapter', adaption_tokens=3, adaption_layers=1),
    'prompt_tuning': dict(peft='prompt', prompt_tokens=2),
}


@pytest.mark.parametrize('variant', VARIANTS)
def test_logits_equal_a_forward_pass_of_each_sequence(variant, rng):
  model = registry.build(small_config(init_std=0.3, **VARIANTS[variant]),
                         rngs=nnx.Rngs(int(rng.integers(1 << 30))))
  n, p, s = int(rng.integers(2, 5)), int(rng.integers(1, 9)), int(rng.integers(2, 7))
  prompt_1p = jnp.asarray(rng.integers(0, 61, (1, p)), jnp.int32)
  own_ns = jnp.asarray(rng.integers(0, 61, (n, s)), jnp.int32)
  whole_nv = jit_call(model)(jnp.concatenate([jnp.repeat(prompt_1p, n, 0), own_ns], axis=1))

  decode = jit_decode(model)
  _, caches = decode(prompt_1p, model.init_cache(1, p), 0)
  caches = shared_prefix.share(caches, n, s)
  first = int(rng.integers(1, s))  # Some tokens at once, then one at a time.
  logits, caches = decode(own_ns[:, :first], caches, p)
  chunks = [logits]
  for i in range(first, s):
    logits, caches = decode(own_ns[:, i:i + 1], caches, p + i)
    chunks.append(logits)
  np.testing.assert_allclose(jnp.concatenate(chunks, axis=1), whole_nv[:, p:], atol=2e-5,
                             rtol=1e-5)


def test_an_int8_cache_shares_as_a_float_one_does(rng):
  """The int8 cache against itself copied (tests/test_kv_cache.py checks it against float)."""
  model = registry.build(small_config(init_std=0.3, kv_cache_dtype='int8'),
                         rngs=nnx.Rngs(int(rng.integers(1 << 30))))
  n, p, s = int(rng.integers(2, 5)), int(rng.integers(1, 9)), int(rng.integers(1, 5))
  prompt_1p = jnp.asarray(rng.integers(0, 61, (1, p)), jnp.int32)
  own_ns = jnp.asarray(rng.integers(0, 61, (n, s)), jnp.int32)
  decode = jit_decode(model)
  _, caches = decode(prompt_1p, model.init_cache(1, p), 0)
  shared, _ = decode(own_ns, shared_prefix.share(caches, n, s), p)
  _, caches = decode(jnp.repeat(prompt_1p, n, 0), model.init_cache(n, p + s), 0)
  copied, _ = decode(own_ns, caches, p)
  np.testing.assert_allclose(shared, copied, atol=2e-5, rtol=1e-5)


def test_samples_equal_those_of_a_copied_prompt(rng):
  model = registry.build(small_config(init_std=0.3), rngs=nnx.Rngs(int(rng.integers(1 << 30))))
  n = int(rng.integers(2, 6))
  sampling = SamplingConfig(max_new_tokens=10, temperature=1.0, top_k=int(rng.integers(0, 8)),
                            repetition_penalty=1.3)
  prompt_1t = jnp.asarray(rng.integers(0, 61, (1, int(rng.integers(1, 8)))), jnp.int32)
  key = jax.random.key(int(rng.integers(1 << 30)))
  shared = make_generate(nnx.graphdef(model), sampling, end_token=60, n_valid=61,
                         num_samples=n)(nnx.state(model), prompt_1t, key)
  copied = make_generate(nnx.graphdef(model), sampling, end_token=60, n_valid=61)(
      nnx.state(model), jnp.repeat(prompt_1t, n, 0), key)
  assert shared.shape == (n, 10)
  np.testing.assert_array_equal(shared, copied)


def test_the_prompt_cache_is_held_once(rng):
  config = small_config(n_layers=int(rng.integers(1, 4)), max_seq_len=600)
  graphdef, state = nnx.split(registry.build(config, rngs=nnx.Rngs(0)))
  n, p, s = int(rng.integers(4, 9)), int(rng.integers(200, 400)), 8
  prompt_1p = jnp.zeros((1, p), jnp.int32)

  def shared(state):
    model = nnx.merge(graphdef, state)
    return shared_prefix.share(model.decode(prompt_1p, model.init_cache(1, p), 0)[1], n, s)

  def copied(state):
    model = nnx.merge(graphdef, state)
    return model.decode(jnp.repeat(prompt_1p, n, 0), model.init_cache(n, p + s), 0)[1]

  def decode_step(state, caches):
    return nnx.merge(graphdef, state).decode(jnp.zeros((n, 1), jnp.int32), caches, p + 1)

  per_token = kv_cache_bytes_per_token(config)
  step_bytes = {}
  for caches_of, positions in [(shared, p + n * s), (copied, n * (p + s))]:
    caches = jax.eval_shape(caches_of, state)
    cache_bytes = sum(leaf.size * leaf.dtype.itemsize for leaf in jax.tree.leaves(caches))
    assert cache_bytes == positions * per_token
    step_bytes[caches_of] = compiled_bytes(
        jax.jit(decode_step, donate_argnums=1).lower(state, caches).compile())
  # Nor does a decoding step make the n - 1 copies of the prompt's keys and values.
  assert step_bytes[copied] - step_bytes[shared] >= 0.9 * (n - 1) * p * per_token


def test_no_samples_and_caches_that_are_not_keys_and_values_are_refused():
  with pytest.raises(ConfigError, match='--num_samples must be at least 1, got 0'):
    make_generate(None, SamplingConfig(), end_token=0, n_valid=1, num_samples=0)
  model = registry.build(small_config(attention_type='mla', kv_lora_rank=8, qk_rope_head_dim=4,
                                      qk_nope_head_dim=8, v_head_dim=8), rngs=nnx.Rngs(0))
  generate = make_generate(nnx.graphdef(model), SamplingConfig(max_new_tokens=2), end_token=60,
                           n_valid=61, num_samples=2)
  with pytest.raises(ConfigError, match='attention_type=mla'):
    generate(nnx.state(model), jnp.zeros((1, 3), jnp.int32), jax.random.key(0))
