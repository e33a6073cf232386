"""Houlsby adapters (models/adapter.py) and LLaMA-Adapter (models/llama_adapter.py): each
against its formula in numpy with random weights, the model each starts as, what trains,
cached decoding, and the config checks."""
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx
from jax.scipy.special import erf
from scipy.special import erf as scipy_erf

from conftest import jit_call, small_config
from lmlab.models import hf, registry
from lmlab.models.adapter import AdapterParam
from lmlab.models.config import without_peft
from lmlab.models.errors import ConfigError
from lmlab.models.generation import SamplingConfig, make_generate
from lmlab.models.llama_adapter import AdaptionPromptParam
from test_generation import naive_greedy

MLA = dict(attention_type='mla', kv_lora_rank=8, qk_rope_head_dim=4, qk_nope_head_dim=4,
           v_head_dim=8)


def build(config, seed: int):
  return registry.build(config, rngs=nnx.Rngs(seed))


def random_tokens(rng, config, shape=(2, 9)):
  return jnp.asarray(rng.integers(0, config.vocab_size, shape), jnp.int32)


def randomise(model, kind, rng, std):
  for _, variable in nnx.to_flat_state(nnx.state(model, kind)):
    variable[...] = jnp.asarray(std * rng.standard_normal(variable.shape), variable.dtype)


def weights(module):
  return {'/'.join(map(str, path)): v[...] for path, v in nnx.to_flat_state(nnx.state(module))}


def houlsby(y, w):
  """y + up(gelu(down(y))) with GELU's erf form, in plain jnp."""
  h = y @ w['down/kernel'] + w['down/bias']
  return y + (0.5 * h * (1.0 + erf(h / np.sqrt(2.0)))) @ w['up/kernel'] + w['up/bias']


def with_adapted_outputs(sublayer, weights, returns_cache):
  """sublayer, its output passed through the adapter formula with `weights`."""
  def run(*args, **kwargs):
    out = sublayer(*args, **kwargs)
    return (houlsby(out[0], weights), *out[1:]) if returns_cache else houlsby(out, weights)
  return run


def test_adapter_is_identity_plus_gelu_bottleneck(rng):
  """One adapter on activations large enough that GELU's erf and tanh forms differ."""
  config = small_config(peft='adapter', adapter_size=int(rng.integers(1, 12)))
  adapter = build(config, int(rng.integers(1 << 30))).blocks[0].mlp_adapter
  randomise(adapter, AdapterParam, rng, std=0.5)
  y = rng.normal(0.0, 3.0, (2, 5, config.d_model))
  w = {name: np.asarray(value, np.float64) for name, value in weights(adapter).items()}
  h = y @ w['down/kernel'] + w['down/bias']
  gelu = 0.5 * h * (1.0 + scipy_erf(h / np.sqrt(2.0)))
  np.testing.assert_allclose(adapter(jnp.asarray(y, jnp.float32)),
                             y + gelu @ w['up/kernel'] + w['up/bias'], atol=2e-4, rtol=1e-5)


@pytest.mark.parametrize('fields', [dict(norm_placement='pre'), dict(norm_placement='post'),
                                    dict(norm_placement='sandwich', use_bias=True),
                                    dict(norm_placement='deepnorm', norm='layernorm'),
                                    dict(parallel_block=True), dict(norm_placement='post', **MLA)])
def test_adapter_follows_each_sublayer_before_the_residual(rng, fields):
  """The adapted model against its base whose attention and MLP outputs pass through the
  formula (with the adapted model's weights) before the block does anything else with them."""
  config = small_config(peft='adapter', adapter_size=int(rng.integers(1, 12)), **fields)
  seed = int(rng.integers(1 << 30))
  adapted, reference = build(config, seed), build(without_peft(config), seed)
  randomise(adapted, AdapterParam, rng, std=0.3)
  for block, plain in zip(adapted.blocks, reference.blocks):
    plain.attention = with_adapted_outputs(plain.attention, weights(block.attn_adapter),
                                           returns_cache=True)
    plain.mlp = with_adapted_outputs(plain.mlp, weights(block.mlp_adapter),
                                     returns_cache=False)
  tokens = random_tokens(rng, config)
  np.testing.assert_allclose(jit_call(adapted)(tokens), jax.jit(reference)(tokens), atol=2e-5,
                             rtol=0)


def test_llama_adapter_adds_the_gated_prompt_attention(rng):
  """One adapted layer's attention output minus its base's is o_proj of
  tanh(g_h) softmax(q_h K_P^T / sqrt(d)) V_P, with the prompt's keys unrotated."""
  config = small_config(peft='llama_adapter', adaption_layers=1, qkv_bias=True, qk_norm=True,
                        adaption_tokens=int(rng.integers(1, 7)))
  model = build(config, int(rng.integers(1 << 30)))
  randomise(model, AdaptionPromptParam, rng, std=4.0)
  attention = model.blocks[-1].attention
  b, t, d, h, kv, hd = 2, 7, config.d_model, config.n_heads, config.n_kv_heads, 8
  x = jnp.asarray(rng.standard_normal((b, t, d)), jnp.float32)
  rotate = model.positions.rotation(jnp.asarray(rng.integers(0, 50, (b, t)), jnp.int32))
  adapted, _ = attention(x, rotate)
  adaption, attention.adaption = attention.adaption, None
  base, _ = attention(x, rotate)

  w = {name: np.asarray(value, np.float64) for name, value in weights(attention).items()}
  p, gate = np.asarray(adaption.prompt[...], np.float64), np.asarray(adaption.gate[...])
  q = (np.asarray(x, np.float64) @ w['q_proj/kernel'] + w['q_proj/bias']).reshape(b, t, h, hd)

  def rms_normed(a, weight):
    return a / np.sqrt(np.mean(a * a, -1, keepdims=True) + config.norm_eps) * weight

  q = np.asarray(rotate(jnp.asarray(rms_normed(q, w['q_norm/scale']), jnp.float32)),
                 np.float64)
  k = rms_normed((p @ w['k_proj/kernel'] + w['k_proj/bias']).reshape(-1, kv, hd),
                 w['k_norm/scale'])
  v = (p @ w['v_proj/kernel'] + w['v_proj/bias']).reshape(-1, kv, hd)
  k, v = np.repeat(k, h // kv, axis=1), np.repeat(v, h // kv, axis=1)  # [Z, H, D]
  scores = np.einsum('bthd,zhd->bhtz', q, k) / np.sqrt(hd)
  probs = np.exp(scores - scores.max(-1, keepdims=True))
  probs /= probs.sum(-1, keepdims=True)
  extra = np.einsum('bhtz,zhd->bthd', probs, v) * np.tanh(gate)[:, None]
  expected = extra.reshape(b, t, h * hd) @ w['o_proj/kernel']
  assert np.abs(expected).max() > 1e-2
  np.testing.assert_allclose(np.asarray(adapted) - np.asarray(base), expected, atol=1e-5,
                             rtol=0)


@pytest.mark.parametrize('fields', [dict(peft='adapter', parallel_block=True),
                                    dict(peft='llama_adapter', adaption_layers=1)])
def test_fresh_model_is_its_base_with_the_same_parameter_paths(rng, fields):
  seed = int(rng.integers(1 << 30))
  config = small_config(dropout_rate=0.2, **fields)
  base, adapted = build(without_peft(config), seed), build(config, seed)
  base_params = dict(nnx.to_flat_state(nnx.state(base, nnx.Param)))
  adapted_params = dict(nnx.to_flat_state(nnx.state(adapted, nnx.Param)))
  peft_params = dict(nnx.to_flat_state(nnx.state(adapted, registry.trainable(config))))
  assert set(adapted_params) == set(base_params) | set(peft_params)
  assert not set(base_params) & set(peft_params)
  for path, variable in base_params.items():
    np.testing.assert_array_equal(adapted_params[path][...], variable[...], err_msg=str(path))
  tokens, key = random_tokens(rng, config), jax.random.key(int(rng.integers(1 << 30)))
  np.testing.assert_allclose(jit_call(adapted)(tokens), jit_call(base)(tokens), atol=1e-6, rtol=0)
  # Dropout keeps its masks: the adapters sit inside the branches it drops.
  np.testing.assert_allclose(jit_call(adapted)(tokens, dropout_key=key),
                             jit_call(base)(tokens, dropout_key=key), atol=1e-6, rtol=0)


@pytest.mark.parametrize('fields, paths, nonzero', [
    (dict(peft='adapter'),
     {('blocks', i, adapter, layer, kind) for i in range(2)
      for adapter in ('attn_adapter', 'mlp_adapter') for layer in ('down', 'up')
      for kind in ('kernel', 'bias')},
     'up'),  # up is zero at first, so down has no gradient yet.
    (dict(peft='llama_adapter', adaption_layers=1),
     {('blocks', 1, 'attention', 'adaption', name) for name in ('prompt', 'gate')},
     'gate'),  # The gate is zero at first, so the prompt has no gradient yet.
])
def test_trainable_selects_the_method_parameters_and_they_get_gradients(rng, fields, paths,
                                                                        nonzero):
  config = small_config(**fields)
  model = build(config, int(rng.integers(1 << 30)))
  trainable = registry.trainable(config)
  assert set(dict(nnx.to_flat_state(nnx.state(model, trainable)))) == paths
  tokens = random_tokens(rng, config)

  @nnx.jit
  def gradients(model, tokens):
    def loss(model):
      logits = model(tokens[:, :-1])
      return optax.softmax_cross_entropy_with_integer_labels(logits, tokens[:, 1:]).mean()
    return nnx.grad(loss, argnums=nnx.DiffState(0, trainable))(model)

  grads = dict(nnx.to_flat_state(gradients(model, tokens)))
  assert set(grads) == paths
  for path, grad in grads.items():
    if nonzero in path:
      assert np.abs(np.asarray(grad[...])).max() > 0, path


def test_llama_adapter_cached_decoding_equals_the_full_forward(rng):
  config = small_config(peft='llama_adapter', adaption_tokens=int(rng.integers(1, 7)),
                        position=str(rng.choice(['rope', 'alibi'])))
  model = build(config, int(rng.integers(1 << 30)))
  for block in model.blocks:
    block.attention.adaption.gate[...] = jnp.asarray(rng.uniform(-3, 3, config.n_heads),
                                                     jnp.float32)
  prompt = random_tokens(rng, config, (2, 5))
  generate = make_generate(nnx.split(model)[0], SamplingConfig(max_new_tokens=10,
                                                               temperature=0.0),
                           end_token=config.vocab_size, n_valid=config.vocab_size)
  got = np.asarray(generate(nnx.state(model), prompt, jax.random.key(0)))
  np.testing.assert_array_equal(got, naive_greedy(model, prompt, 10, config.vocab_size))


def test_bad_adapter_configs_are_named_errors():
  for size in (0, -3):
    with pytest.raises(ConfigError, match=f'adapter_size={size} must be positive'):
      small_config(peft='adapter', adapter_size=size)
  for layers in (3, -1):
    with pytest.raises(ConfigError, match=rf'adaption_layers={layers} must be in \[0, n_layers=2'):
      small_config(peft='llama_adapter', adaption_layers=layers)
  with pytest.raises(ConfigError, match='adaption_tokens=0 must be positive'):
    small_config(peft='llama_adapter', adaption_tokens=0)
  with pytest.raises(ConfigError, match='adapter_size=8 applies to peft=adapter only'):
    small_config(peft='llama_adapter', adapter_size=8)
  with pytest.raises(ConfigError, match='adaption_tokens=3 applies to peft=llama_adapter only'):
    small_config(adaption_tokens=3)
  with pytest.raises(ConfigError, match='peft=adapter adapts a decoder, not family=encoder'):
    small_config(peft='adapter', family='encoder', causal=False)
  with pytest.raises(ConfigError, match='peft=llama_adapter adapts the MHA projections; '
                                        'attention_type=mla'):
    small_config(peft='llama_adapter', **MLA)
  with pytest.raises(ConfigError, match='dca_chunk_size'):
    small_config(peft='llama_adapter', dca_chunk_size=16)



def test_llama_adapter_matches_peft_adaption_prompt(rng, tmp_path):
  """peft's AdaptionPrompt on the same Llama, its prompts ours and its one gate per layer
  tanh of ours (every head's gate equal)."""
  torch = pytest.importorskip('torch')
  transformers = pytest.importorskip('transformers')
  peft = pytest.importorskip('peft')
  from test_hf import TINY, hf_logits  # Needs torch and transformers.
  n_tokens = int(rng.integers(1, 7))
  config = small_config(vocab_size=TINY['vocab_size'], init_std=0.2, peft='llama_adapter',
                        adaption_layers=1, adaption_tokens=n_tokens)
  seed = int(rng.integers(1 << 30))
  hf.save(build(without_peft(config), seed), str(tmp_path))
  model = build(config, seed)
  adaption = model.blocks[-1].attention.adaption
  adaption.gate[...] = jnp.full(config.n_heads, rng.uniform(-2, 2), jnp.float32)
  theirs = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path))
  theirs = peft.get_peft_model(theirs, peft.AdaptionPromptConfig(
      task_type='CAUSAL_LM', adapter_len=n_tokens, adapter_layers=1)).eval()
  with torch.no_grad():
    values = {'adaption_prompt': np.asarray(adaption.prompt[...])[None],
              'adaption_gate': np.tanh(np.asarray(adaption.gate[...])[:1])}
    named = [(name, p) for name, p in theirs.named_parameters() if '.adaption_' in name]
    assert len(named) == 2 and all(f'layers.{config.n_layers - 1}.' in n for n, _ in named)
    for name, parameter in named:
      parameter.copy_(torch.tensor(values[name.rsplit('.', 1)[1]]))
  ids = random_tokens(rng, config)
  expected = hf_logits(theirs, ids)
  assert np.abs(np.asarray(jit_call(build(without_peft(config), seed))(ids))
                - expected).max() > 0.1  # The adapter counts.
  np.testing.assert_allclose(jit_call(model)(ids), expected, atol=1e-4, rtol=0)
