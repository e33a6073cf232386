"""Prefix tuning (models/prefix_tuning.py, models/hf/prefix_tuning.py): our logits against
transformers with Hugging Face peft's PREFIX_TUNING both ways (with and without the
reparameterisation MLP, GQA and qkv biases), one layer's attention against a plain softmax
over prefix and row, padded rows, cached greedy generation, what a run trains, and the named
errors of bad configs, inputs and folders."""
import dataclasses

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from conftest import config_rewriter, jit_call, small_config
from lmlab.models import hf, registry
from lmlab.models.errors import CheckpointError, ConfigError
from lmlab.models.hf import adapters
from lmlab.models.hf import prefix_tuning as hf_prefix_tuning
from lmlab.models.prefix_tuning import PrefixParam, add_prefix
from test_hf import TINY, hf_logits, saved_by_peft

from test_prompt_tuning import FAMILIES, greedy, random_ids, seed

torch = pytest.importorskip('torch')
transformers = pytest.importorskip('transformers')
peft = pytest.importorskip('peft')


def prefix_tuned(rng, o: int, projection: int = 0, **fields):
  """(a random base decoder of TINY's shape, a copy of it with o random prefix vectors per
  layer, through an MLP of width `projection` when > 0)."""
  base = registry.build(small_config(vocab_size=TINY['vocab_size'], init_std=0.2, **fields),
                        rngs=nnx.Rngs(seed(rng)))
  config = dataclasses.replace(base.config, peft='prefix', prefix_tokens=o,
                               prefix_projection=projection)
  tuned = add_prefix(nnx.clone(base), config, rngs=nnx.Rngs(seed(rng)))
  # The MLP's output weights start at init_std; larger ones give prefixes that matter.
  for path, variable in nnx.to_flat_state(nnx.state(tuned, PrefixParam)):
    variable.set_value(jnp.asarray(rng.normal(0.0, 0.5, variable.shape), jnp.float32))
  return base, tuned


def exported(base, tuned, tmp_path):
  """The transformers + peft model of our tuned one, through hf.save and a peft folder."""
  hf.save(base, str(tmp_path / 'base'))
  adapters.save(tuned, str(tmp_path / 'adapter'), base_model_name_or_path='base')
  theirs = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path / 'base'))
  return peft.PeftModel.from_pretrained(theirs, str(tmp_path / 'adapter')).eval()


@pytest.mark.parametrize('family,projection', [('Llama', 0), ('Qwen2', 0), ('Llama', 7)])
def test_saved_prefix_loads_in_peft_and_back(family, projection, rng, tmp_path):
  base, tuned = prefix_tuned(rng, int(rng.integers(1, 6)), projection, **FAMILIES[family])
  theirs = exported(base, tuned, tmp_path)
  assert type(theirs.get_base_model()).__name__ == f'{family}ForCausalLM'
  ids = random_ids(rng)
  expected = hf_logits(theirs, ids)
  assert np.abs(np.asarray(base(jnp.asarray(ids))) - expected).max() > 0.1  # The prefix counts.
  np.testing.assert_allclose(np.asarray(tuned(jnp.asarray(ids))), expected, atol=1e-4, rtol=0)
  # Read back, the folded vectors compute what the MLP did.
  back = adapters.load(base, str(tmp_path / 'adapter'))
  assert back.config == dataclasses.replace(tuned.config, prefix_projection=0)
  np.testing.assert_allclose(np.asarray(back(jnp.asarray(ids))), expected, atol=1e-4, rtol=0)


def test_peft_prefix_folder_loads_with_load_prefix(rng, tmp_path):
  o = int(rng.integers(1, 6))
  theirs = saved_by_peft('Llama', peft.PrefixTuningConfig(task_type='CAUSAL_LM',
                                                          num_virtual_tokens=o),
                         tmp_path, seed(rng), lambda _, x: 0.5 * torch.randn_like(x))

  base = hf.load(str(tmp_path / 'base'))
  ours = adapters.load(base, str(tmp_path / 'adapter'))
  assert ours.config == dataclasses.replace(base.config, peft='prefix', prefix_tokens=o)
  assert base.config.peft == '' and base.blocks[0].attention.prefix is None
  ids = random_ids(rng)
  np.testing.assert_allclose(np.asarray(ours(jnp.asarray(ids))), hf_logits(theirs, ids),
                             atol=1e-4, rtol=0)


def test_one_layer_attends_to_prefix_and_row_in_one_softmax(rng):
  """The attention output of a layer, against softmax over [prefix keys, causal row keys]
  written out in numpy: prefix keys as stored (no rotation), row keys rotated."""
  config = small_config(peft='prefix', prefix_tokens=int(rng.integers(1, 5)))
  model = registry.build(config, rngs=nnx.Rngs(seed(rng)))
  attention = model.blocks[0].attention
  prefix = attention.prefix
  for _, variable in nnx.to_flat_state(nnx.state(prefix, PrefixParam)):
    variable.set_value(jnp.asarray(rng.normal(0.0, 1.0, variable.shape), jnp.float32))
  b, t = 2, int(rng.integers(2, 9))
  x_btd = jnp.asarray(rng.normal(0.0, 1.0, (b, t, config.d_model)), jnp.float32)
  rotate = model.positions.rotation(jnp.broadcast_to(jnp.arange(t), (b, t)))
  got = np.asarray(attention(x_btd, rotate)[0])

  h, kv, d = config.n_heads, config.n_kv_heads, config.resolved_head_dim
  q = np.asarray(rotate(attention.q_proj(x_btd).reshape(b, t, h, d)))
  k_row, v_row = (np.asarray(a) for a in attention.keys_values(x_btd))
  k_row = np.asarray(rotate(jnp.asarray(k_row)))
  k_pre, v_pre = (np.asarray(a) for a in prefix.keys_values())
  o = k_pre.shape[0]
  k = np.concatenate([np.broadcast_to(k_pre, (b, o, kv, d)), k_row], axis=1)
  v = np.concatenate([np.broadcast_to(v_pre, (b, o, kv, d)), v_row], axis=1)
  k, v = np.repeat(k, h // kv, axis=2), np.repeat(v, h // kv, axis=2)
  scores = np.einsum('bthd,bshd->bhts', q, k) * config.softmax_scale
  visible = np.arange(o + t)[None, :] <= o + np.arange(t)[:, None]
  scores = np.where(visible, scores, -np.inf)
  probs = np.exp(scores - scores.max(-1, keepdims=True))
  probs /= probs.sum(-1, keepdims=True)
  y = np.einsum('bhts,bshd->bthd', probs, v).reshape(b, t, h * d)
  expected = y @ np.asarray(attention.o_proj.kernel[...])
  np.testing.assert_allclose(got, expected, atol=1e-5, rtol=1e-5)


def test_padded_rows_and_cached_generation_match_peft(rng, tmp_path):
  """Right-padded rows give peft's logits at their real tokens; greedy generation with the
  KV cache picks peft's argmax after the prompt and each token made."""
  base, tuned = prefix_tuned(rng, int(rng.integers(1, 6)))
  theirs = exported(base, tuned, tmp_path)
  lengths = rng.integers(1, 9, 2)
  mask = (np.arange(9)[None] < lengths[:, None]).astype(np.int32)
  ids = np.where(mask == 1, random_ids(rng), 0)
  got = np.asarray(jit_call(tuned)(jnp.asarray(ids), attention_mask=jnp.asarray(mask)))
  real = mask == 1
  np.testing.assert_allclose(got[real], hf_logits(theirs, ids, mask)[real], atol=1e-4, rtol=0)

  prompt, made = greedy(tuned, rng)
  vocab = tuned.config.vocab_size
  logits = hf_logits(theirs, np.concatenate([prompt, made], axis=1))
  t = prompt.shape[1]
  np.testing.assert_array_equal(made, logits[:, t - 1:-1, :vocab - 1].argmax(-1))


@pytest.mark.parametrize('projection', [0, 5])
def test_a_prefix_tuning_run_trains_only_the_prefixes(projection, rng):
  o = int(rng.integers(1, 6))
  config = small_config(peft='prefix', prefix_tokens=o, prefix_projection=projection)
  model = registry.build(config, rngs=nnx.Rngs(seed(rng)))
  trained = nnx.to_flat_state(nnx.state(model, registry.trainable(config)))
  kv_width = config.n_kv_heads * config.resolved_head_dim
  per_layer = ({'k_okd': o * kv_width, 'v_okd': o * kv_width} if not projection else
               {'embedding_od': o * config.d_model, 'w_in_dx': config.d_model * projection,
                'b_in_x': projection, 'w_out_xx': projection * 2 * kv_width,
                'b_out_x': 2 * kv_width})
  assert {path: variable.size for path, variable in trained} == {
      ('blocks', i, 'attention', 'prefix', name): size
      for i in range(config.n_layers) for name, size in per_layer.items()}
  if projection:  # tanh(E W_in + b_in) W_out + b_out, split into keys then values.
    prefix = model.blocks[0].attention.prefix
    values = {name: np.asarray(getattr(prefix, name)[...]) for name in per_layer}
    flat = (np.tanh(values['embedding_od'] @ values['w_in_dx'] + values['b_in_x'])
            @ values['w_out_xx'] + values['b_out_x'])
    k_okd, v_okd = prefix.keys_values()
    np.testing.assert_allclose(np.asarray(k_okd).reshape(o, -1), flat[:, :kv_width], atol=1e-5)
    np.testing.assert_allclose(np.asarray(v_okd).reshape(o, -1), flat[:, kv_width:], atol=1e-5)


def test_bad_prefix_configs_inputs_and_folders_are_named_errors(rng, tmp_path):
  for fields, message in [
      (dict(peft='prefix', prefix_tokens=0), 'prefix_tokens=0 must be positive'),
      (dict(peft='prefix', prefix_projection=-1), 'prefix_projection=-1 must be >= 0'),
      (dict(prefix_tokens=4), 'prefix_tokens=4 applies to peft=prefix only'),
      (dict(peft='prefix', sliding_window=4), 'a sliding window would hide the prefix'),
      (dict(peft='prefix', attention_type='mla', kv_lora_rank=8, qk_rope_head_dim=4,
            qk_nope_head_dim=4, v_head_dim=8), 'attention_type=mla is not covered'),
  ]:
    with pytest.raises(ConfigError, match=message):
      small_config(**fields)
  base, tuned = prefix_tuned(rng, 3)
  ids = jnp.asarray(random_ids(rng, (1, 4)))
  with pytest.raises(ConfigError, match='peft=prefix takes unpacked rows'):
    tuned(ids, segment_ids_bt=jnp.ones_like(ids), positions_bt=jnp.zeros_like(ids))

  folder = str(tmp_path / 'adapter')
  hf_prefix_tuning.save_prefix(tuned, folder)
  write_config = config_rewriter(folder)
  for changes, message in [
      (dict(num_layers=3), "num_layers=3 is not the base model's 2"),
      (dict(token_dim=32), "token_dim=32 is not the base model's 16"),
      (dict(num_virtual_tokens=0), 'prefix_tokens=0 must be positive'),
      (dict(num_virtual_tokens=4), r'prompt_embeddings has shape \(3, 64\), not \(4, 64\)'),
      (dict(peft_type='PROMPT_TUNING'), 'token_dim=16 is not the base model\'s width'),
  ]:
    write_config(**changes)
    with pytest.raises(CheckpointError, match=message):
      adapters.load(base, folder)
  learned = registry.build(dataclasses.replace(base.config, position='learned'),
                           rngs=nnx.Rngs(0))
  write_config()
  with pytest.raises(CheckpointError, match='with position=learned the model does not compute'):
    adapters.load(learned, folder)
  with pytest.raises(CheckpointError, match="to a plain model, not to one with peft='prefix'"):
    hf_prefix_tuning.load_prefix(tuned, folder)
