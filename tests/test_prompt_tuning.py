"""Prompt tuning (models/prompt_tuning.py, models/hf/prompt_tuning.py): our logits against
transformers with Hugging Face peft's PROMPT_TUNING, both ways, padded rows, cached greedy
generation, what a run trains, and the named errors of bad configs and folders."""
import dataclasses
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from conftest import config_rewriter, jit_call, small_config
from lmlab.models import hf, registry
from lmlab.models.errors import CheckpointError, ConfigError
from lmlab.models.generation import SamplingConfig, make_generate
from lmlab.models.hf import adapters, peft_folders, safetensors_files
from lmlab.models.hf import prompt_tuning as hf_prompt_tuning
from lmlab.models.prompt_tuning import PromptParam, add_prompt
from test_hf import TINY, hf_logits, saved_by_peft

torch = pytest.importorskip('torch')
transformers = pytest.importorskip('transformers')
peft = pytest.importorskip('peft')

# transformers family: our base config's fields for it.
FAMILIES = {'Llama': dict(), 'Qwen2': dict(qkv_bias=True, norm_eps=1e-6)}


def seed(rng) -> int:
  return int(rng.integers(1 << 30))


def prompt_tuned(rng, p: int, **fields):
  """(a random base decoder of TINY's shape, a copy of it with p random virtual tokens)."""
  base = registry.build(small_config(vocab_size=TINY['vocab_size'], init_std=0.2, **fields),
                        rngs=nnx.Rngs(seed(rng)))
  config = dataclasses.replace(base.config, peft='prompt', prompt_tokens=p)
  tuned = add_prompt(nnx.clone(base), config, rngs=nnx.Rngs(seed(rng)))
  tuned.prompt.embedding.set_value(jnp.asarray(rng.normal(0.0, 0.5, (p, config.d_model)),
                                               jnp.float32))
  return base, tuned


def random_ids(rng, shape=(2, 9)):
  return rng.integers(0, TINY['vocab_size'], shape)


def peft_logits(model, ids, mask=None):
  """peft's logits of the row's tokens: it returns the virtual tokens' too, first."""
  logits = hf_logits(model, ids, mask)
  return logits[:, logits.shape[1] - ids.shape[1]:]


def exported(base, tuned, tmp_path):
  """The transformers + peft model of our tuned one, through hf.save and a peft folder."""
  hf.save(base, str(tmp_path / 'base'))
  adapters.save(tuned, str(tmp_path / 'adapter'), base_model_name_or_path='base')
  theirs = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path / 'base'))
  return peft.PeftModel.from_pretrained(theirs, str(tmp_path / 'adapter')).eval()


@pytest.mark.parametrize('family', list(FAMILIES))
def test_saved_prompt_loads_in_peft(family, rng, tmp_path):
  base, tuned = prompt_tuned(rng, int(rng.integers(1, 6)), **FAMILIES[family])
  theirs = exported(base, tuned, tmp_path)
  assert type(theirs.get_base_model()).__name__ == f'{family}ForCausalLM'
  ids = random_ids(rng)
  expected = peft_logits(theirs, ids)
  assert np.abs(np.asarray(base(jnp.asarray(ids))) - expected).max() > 0.1  # The prompt counts.
  np.testing.assert_allclose(np.asarray(tuned(jnp.asarray(ids))), expected, atol=1e-4, rtol=0)


@pytest.mark.parametrize('family', list(FAMILIES))
def test_peft_prompt_folder_loads_with_load_prompt(family, rng, tmp_path):
  p = int(rng.integers(1, 6))
  theirs = saved_by_peft(family, peft.PromptTuningConfig(task_type='CAUSAL_LM',
                                                         num_virtual_tokens=p),
                         tmp_path, seed(rng), lambda _, x: 0.5 * torch.randn_like(x))

  base = hf.load(str(tmp_path / 'base'))
  ours = adapters.load(base, str(tmp_path / 'adapter'))
  assert ours.config == dataclasses.replace(base.config, peft='prompt', prompt_tokens=p)
  assert base.prompt is None and base.config.peft == ''  # The base model is left plain.
  ids = random_ids(rng)
  np.testing.assert_allclose(np.asarray(ours(jnp.asarray(ids))), peft_logits(theirs, ids),
                             atol=1e-4, rtol=0)


def test_padded_rows_match_peft(rng, tmp_path):
  """Right-padded rows give peft's logits. A left-padded row gives the logits of the row
  alone, as peft does not: it places the row's tokens after its padding."""
  base, tuned = prompt_tuned(rng, int(rng.integers(1, 6)))
  theirs = exported(base, tuned, tmp_path)
  lengths = rng.integers(1, 9, 2)
  mask = (np.arange(9)[None] < lengths[:, None]).astype(np.int32)
  ids = np.where(mask == 1, random_ids(rng), 0)
  forward = jit_call(tuned)
  got = np.asarray(forward(jnp.asarray(ids), attention_mask=jnp.asarray(mask)))
  real = mask == 1
  np.testing.assert_allclose(got[real], peft_logits(theirs, ids, mask)[real], atol=1e-4, rtol=0)

  left_ids, left_mask = ids[:, ::-1].copy(), mask[:, ::-1].copy()
  for row, n in enumerate(lengths):
    left_ids[row, 9 - n:] = ids[row, :n]
  got = np.asarray(forward(jnp.asarray(left_ids), attention_mask=jnp.asarray(left_mask)))
  for row, n in enumerate(lengths):
    alone = peft_logits(theirs, ids[row:row + 1, :n])[0]
    np.testing.assert_allclose(got[row, 9 - n:], alone, atol=1e-4, rtol=0)


def greedy(model, rng, n_new=5):
  """(a random prompt [2, T], the n_new tokens greedy cached generation makes after it)."""
  prompt = random_ids(rng, (2, int(rng.integers(1, 8))))
  vocab = model.config.vocab_size
  graphdef, params = nnx.split(model)
  # The last id is the end token, never chosen, so that every row makes all n_new tokens.
  generate = make_generate(graphdef, SamplingConfig(max_new_tokens=n_new, temperature=0.0),
                           end_token=vocab - 1, n_valid=vocab - 1)
  return prompt, np.asarray(generate(params, jnp.asarray(prompt), jax.random.key(0)))


def test_cached_greedy_generation_equals_the_full_forward_argmax(rng):
  _, tuned = prompt_tuned(rng, int(rng.integers(1, 6)), position='learned')
  prompt, got = greedy(tuned, rng)
  vocab = tuned.config.vocab_size
  # Greedy: each new token is the argmax of the full forward pass over the tokens before it.
  logits = np.asarray(jit_call(tuned)(jnp.concatenate([prompt, got], axis=1)))
  t = prompt.shape[1]
  np.testing.assert_array_equal(got, logits[:, t - 1:-1, :vocab - 1].argmax(-1))


def test_a_prompt_tuning_run_trains_only_the_prompt(rng):
  config = small_config(peft='prompt', prompt_tokens=int(rng.integers(1, 6)),
                        prompt_init='vocab')
  model = registry.build(config, rngs=nnx.Rngs(seed(rng)))
  trained = nnx.to_flat_state(nnx.state(model, registry.trainable(config)))
  assert [path for path, _ in trained] == [('prompt', 'embedding')]
  assert registry.trainable(config) is PromptParam
  prompt_yd = np.asarray(trained[0][1].get_value())
  table_vd = np.asarray(model.embed.embedding[...])
  assert prompt_yd.shape == (config.prompt_tokens, config.d_model)
  # 'vocab': each virtual token starts as some token's embedding.
  assert (np.abs(prompt_yd[:, None] - table_vd[None]).max(-1) == 0).any(-1).all()
  frozen = len(jax.tree.leaves(nnx.state(registry.build(dataclasses.replace(
      config, peft='', prompt_tokens=20, prompt_init='random'), rngs=nnx.Rngs(0)))))
  assert len(jax.tree.leaves(nnx.state(model))) == frozen + 1


def test_bad_prompt_configs_and_inputs_are_named_errors(rng):
  for fields, message in [
      (dict(peft='prompt', prompt_tokens=0), 'prompt_tokens=0 must be positive'),
      (dict(prompt_tokens=4), 'prompt_tokens=4 applies to peft=prompt only'),
      (dict(peft='prompt', prompt_init='text'), "prompt_init='text' is not one of"),
      (dict(peft='prompt', prompt_tokens=65, position='learned'), 'prompt_tokens \\(65\\) is '
       'longer than the learned position table'),
  ]:
    with pytest.raises(ConfigError, match=message):
      small_config(**fields)
  model = registry.build(small_config(peft='prompt', prompt_tokens=3), rngs=nnx.Rngs(0))
  ids = jnp.asarray(random_ids(rng, (1, 4)))
  with pytest.raises(ConfigError, match='peft=prompt takes unpacked rows'):
    model(ids, segment_ids_bt=jnp.zeros_like(ids), positions_bt=jnp.zeros_like(ids))


@pytest.fixture
def adapter(rng, tmp_path):
  """(base model, a peft prompt-tuning folder for it, a function that rewrites that folder's
  adapter_config.json with some fields changed)."""
  base, tuned = prompt_tuned(rng, 3)
  folder = str(tmp_path / 'adapter')
  hf_prompt_tuning.save_prompt(tuned, folder)
  return base, folder, config_rewriter(folder)


def test_bad_prompt_folders_are_named_errors(adapter):
  base, folder, write_config = adapter
  for changes, message in [
      (dict(token_dim=16), 'token_dim=16 is not the base model\'s width d_model=32'),
      (dict(num_virtual_tokens=0), 'prompt_tokens=0 must be positive'),
      (dict(num_virtual_tokens='3'), "num_virtual_tokens='3' is not an integer"),
      (dict(num_transformer_submodules=2), 'num_transformer_submodules=2 is not 1'),
      (dict(prompt_tuning_init='TXT'), "prompt_tuning_init='TXT' is not one of"),
      (dict(task_type='SEQ_2_SEQ_LM'), "task_type='SEQ_2_SEQ_LM' is not CAUSAL_LM"),
  ]:
    write_config(**changes)
    with pytest.raises(CheckpointError, match=f'adapter_config.json: {message}'):
      adapters.load(base, folder)
  write_config(peft_type='IA3')
  with pytest.raises(CheckpointError, match="peft_type='IA3' is not one of LORA, PROMPT_TUNING"):
    adapters.load(base, folder)
  with pytest.raises(CheckpointError, match="peft_type='IA3' is not PROMPT_TUNING"):
    hf_prompt_tuning.load_prompt(base, folder)
  write_config(num_virtual_tokens=4)
  with pytest.raises(CheckpointError, match=r'prompt_embeddings has shape \(3, 32\), not '
                                            r'\(4, 32\)'):
    adapters.load(base, folder)
  weights = os.path.join(folder, peft_folders.WEIGHTS_FILE)
  os.remove(weights)
  safetensors_files.write(weights, {'prompt_embeddings': np.zeros((4, 32), np.float32),
                                    'extra': np.zeros(1, np.float32)})
  with pytest.raises(CheckpointError, match="holds \\['extra', 'prompt_embeddings'\\], not the "
                                            "one tensor"):
    adapters.load(base, folder)
  os.remove(weights)
  with pytest.raises(CheckpointError, match='has no adapter_model.safetensors'):
    adapters.load(base, folder)


def test_plain_and_prompt_tuned_models_are_not_mistaken_for_each_other(rng, tmp_path):
  base, tuned = prompt_tuned(rng, 2)
  with pytest.raises(CheckpointError, match="this model has peft=''"):
    hf_prompt_tuning.save_prompt(base, str(tmp_path / 'a'))
  with pytest.raises(CheckpointError, match="peft=''.*no adapter to save"):
    adapters.save(base, str(tmp_path / 'a'))
  hf_prompt_tuning.save_prompt(tuned, str(tmp_path / 'a'))
  with pytest.raises(CheckpointError, match="to a plain model, not to one with peft='prompt'"):
    hf_prompt_tuning.load_prompt(tuned, str(tmp_path / 'a'))
  with pytest.raises(CheckpointError, match='merge them into it first'):
    hf.save(tuned, str(tmp_path / 'hf'))
