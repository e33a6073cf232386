"""LoRA (models/lora.py): each adapted layer against the formula x W + b + x A B * scale in
numpy, the model it starts as, its config checks, merging, and its dropout.

The interop with Hugging Face peft is tests/test_hf_peft.py.
"""
import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from conftest import jit_call, small_config
from lmlab.models import registry
from lmlab.models.config import without_peft
from lmlab.models.errors import ConfigError
from lmlab.models.lora import LoRADense, add_lora, merge
from lmlab.models.sharding import EMBED, HEADS

# Where each target's layer is in a block.
LAYERS = {'q': ('attention', 'q_proj'), 'k': ('attention', 'k_proj'),
          'v': ('attention', 'v_proj'), 'o': ('attention', 'o_proj'), 'gate': ('mlp', 'gate'),
          'up': ('mlp', 'up'), 'down': ('mlp', 'down')}


def lora_config(**fields):
  return small_config(**{'peft': 'lora', 'lora_rank': 4, **fields})


def build(config, seed: int):
  return registry.build(config, rngs=nnx.Rngs(seed))


def randomise_adapters(model, rng, std=0.05):
  """A and B drawn at random: updates that change the logits about as much as they are large,
  with activations of the base model's size (so that float32 rounding stays far below the
  tolerances)."""
  for _, variable in nnx.to_flat_state(nnx.state(model, nnx.LoRAParam)):
    variable[...] = jnp.asarray(std * rng.standard_normal(variable.shape), variable.dtype)


def random_tokens(rng, config, shape=(2, 9)):
  return jnp.asarray(rng.integers(0, config.vocab_size, shape), jnp.int32)


@pytest.mark.parametrize('rslora', [False, True])
def test_adapted_layer_is_base_plus_scaled_low_rank_update(rng, rslora):
  rank, alpha = int(rng.integers(1, 9)), float(rng.uniform(0.5, 32.0))
  config = lora_config(lora_rank=rank, lora_alpha=alpha, lora_rslora=rslora, qkv_bias=True,
                       lora_targets='q,down')
  model = build(config, int(rng.integers(1 << 30)))
  randomise_adapters(model, rng)
  scale = alpha / (np.sqrt(rank) if rslora else rank)
  for sublayer, name in (('attention', 'q_proj'), ('mlp', 'down')):
    layer = getattr(getattr(model.blocks[1], sublayer), name)
    x = rng.standard_normal((2, 5, layer.kernel.shape[0])).astype(np.float32)
    w, a, b = (np.asarray(v[...], np.float64) for v in (layer.kernel, layer.lora_a, layer.lora_b))
    expected = x @ w + x @ a @ b * scale
    if layer.bias is not None:
      expected += np.asarray(layer.bias[...])
    np.testing.assert_allclose(np.asarray(layer(jnp.asarray(x))), expected, atol=1e-5, rtol=1e-5)


def test_fresh_lora_model_is_its_base_with_the_same_parameter_paths(rng):
  seed = int(rng.integers(1 << 30))
  config = lora_config(lora_targets='q_proj, v,gate,down_proj', lora_rank=int(rng.integers(1, 9)))
  base, adapted = build(without_peft(config), seed), build(config, seed)
  base_params = dict(nnx.to_flat_state(nnx.state(base, nnx.Param)))
  adapted_params = dict(nnx.to_flat_state(nnx.state(adapted, nnx.Param)))
  lora_params = dict(nnx.to_flat_state(nnx.state(adapted, nnx.LoRAParam)))
  assert set(lora_params) == {('blocks', i, *LAYERS[name], kind) for i in range(2)
                              for name in ('q', 'v', 'gate', 'down')
                              for kind in ('lora_a', 'lora_b')}
  assert set(adapted_params) == set(base_params) | set(lora_params)
  for path, variable in base_params.items():
    np.testing.assert_array_equal(adapted_params[path][...], variable[...], err_msg=str(path))

  abstract = dict(nnx.to_flat_state(nnx.state(registry.abstract_model(config))))
  assert {p: v.shape for p, v in abstract.items()} == {p: v.shape
                                                       for p, v in adapted_params.items()}
  q_proj = adapted.blocks[0].attention.q_proj
  assert q_proj.lora_a.get_metadata()['logical_axes'] == (EMBED, None)
  assert q_proj.lora_b.get_metadata()['logical_axes'] == (None, HEADS)
  # peft's initialisation: A uniform on [-1/sqrt(D_in), 1/sqrt(D_in)], B zero.
  a, bound = np.asarray(q_proj.lora_a[...]), config.d_model ** -0.5
  assert 0.9 * bound < np.abs(a).max() <= bound
  assert not np.any(np.asarray(q_proj.lora_b[...]))

  tokens = random_tokens(rng, config)
  np.testing.assert_allclose(jit_call(adapted)(tokens), jit_call(base)(tokens), atol=1e-6, rtol=0)


def test_bad_lora_configs_are_named_errors():
  with pytest.raises(ConfigError, match="'qq' is not one of q, k, v, o"):
    lora_config(lora_targets='q,qq')
  with pytest.raises(ConfigError, match="'' is not one of"):
    lora_config(lora_targets='q,')
  for rank in (0, -2):
    with pytest.raises(ConfigError, match=f'lora_rank={rank} must be positive'):
      lora_config(lora_rank=rank)
  with pytest.raises(ConfigError, match='lora_dropout=1.0'):
    lora_config(lora_dropout=1.0)
  with pytest.raises(ConfigError, match='lora_alpha=0.0'):
    lora_config(lora_alpha=0.0)
  with pytest.raises(ConfigError, match='lora_rank=4 applies to peft=lora only'):
    small_config(lora_rank=4)
  with pytest.raises(ConfigError, match="peft='ia3' is not one of"):
    small_config(peft='ia3')
  with pytest.raises(ConfigError, match='attention_type=mla'):
    lora_config(attention_type='mla', kv_lora_rank=8, qk_rope_head_dim=4, qk_nope_head_dim=4,
                v_head_dim=8)
  config = lora_config(mlp='gelu', lora_targets='q,gate')  # A plain MLP has no gate.
  with pytest.raises(ConfigError, match="names 'gate'.*mlp/gate"):
    registry.abstract_model(config)
  plain = registry.abstract_model(small_config())
  with pytest.raises(ConfigError, match='another model'):
    add_lora(plain, lora_config(d_model=64), rngs=nnx.Rngs(0))
  assert lora_config(lora_targets='up_proj, q,q_proj').lora_target_names == ('up', 'q')


def test_merged_model_computes_the_adapted_one(rng):
  config = lora_config(lora_targets='q,k,v,o,gate,up,down', lora_rslora=True, use_bias=True)
  seed = int(rng.integers(1 << 30))
  adapted = build(config, seed)
  randomise_adapters(adapted, rng)
  tokens = random_tokens(rng, config)
  expected = jit_call(adapted)(tokens)
  assert np.abs(jit_call(build(without_peft(config), seed))(tokens) - expected).max() > 0.1
  merged = merge(adapted)
  assert merged.config == without_peft(config)
  assert not jax.tree.leaves(nnx.state(merged, nnx.LoRAParam))
  np.testing.assert_allclose(jit_call(merged)(tokens), expected, atol=1e-5, rtol=0)
  np.testing.assert_array_equal(jit_call(adapted)(tokens), expected)  # Left as it was.


def test_adapter_dropout_drops_inputs_and_rescales(rng):
  """With A = B = I and a zero kernel, a layer's output is its adapter's dropped input."""
  config = lora_config(d_model=32, n_heads=4, n_kv_heads=4, lora_rank=32, lora_alpha=32.0,
                       lora_dropout=0.5, lora_targets='q')
  layer = build(config, 0).blocks[0].attention.q_proj
  assert isinstance(layer, LoRADense)
  layer.kernel[...] = jnp.zeros_like(layer.kernel[...])
  layer.lora_a[...] = jnp.eye(32)
  layer.lora_b[...] = jnp.eye(32)
  x = jnp.asarray(rng.uniform(1.0, 2.0, (8, 16, 32)), jnp.float32)
  np.testing.assert_allclose(layer(x), x, rtol=1e-6)
  key = jax.random.key(int(rng.integers(1 << 30)))
  y = np.asarray(layer(x, dropout_key=key))
  kept = y != 0
  np.testing.assert_allclose(y[kept], 2.0 * np.asarray(x)[kept], rtol=1e-6)
  assert abs(kept.mean() - 0.5) < 0.05
  assert np.any(np.asarray(layer(x, dropout_key=jax.random.fold_in(key, 1)) != 0) != kept)


def test_adapter_dropout_leaves_the_branch_dropout_masks_alone(rng):
  """A fresh adapter adds zero whatever its dropout mask, so a LoRA model with dropout
  computes what its base does with the same key; once trained, its adapters' dropout shows."""
  seed = int(rng.integers(1 << 30))
  config = lora_config(n_layers=1, dropout_rate=0.2, lora_dropout=0.3,
                       lora_targets='q,k,v,o,gate,up,down')
  base, adapted = build(without_peft(config), seed), build(config, seed)
  tokens, key = random_tokens(rng, config), jax.random.key(int(rng.integers(1 << 30)))
  np.testing.assert_allclose(jit_call(adapted)(tokens, dropout_key=key),
                             jit_call(base)(tokens, dropout_key=key), atol=1e-6, rtol=0)

  no_branch_dropout = dataclasses.replace(config, dropout_rate=0.0)
  adapted = build(no_branch_dropout, seed)
  randomise_adapters(adapted, rng)
  run = jit_call(adapted)
  assert np.abs(run(tokens, dropout_key=key) - run(tokens)).max() > 1e-3
