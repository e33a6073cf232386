"""Trainable token rows (models/trainable_tokens.py) beside LoRA: our logits against
transformers with Hugging Face peft's trainable_token_indices both ways (tied and untied
heads), the merged model against the unmerged, the embedding of a listed token against its
row plus delta, what a run trains, and the named errors of bad configs and folders."""
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from conftest import config_rewriter, small_config
from lmlab.models import hf, lora, registry
from lmlab.models.errors import CheckpointError, ConfigError
from lmlab.models.hf import adapters
from lmlab.models.trainable_tokens import TokenRowsParam
from test_hf import TINY, hf_logits, saved_by_peft
from test_lora import randomise_adapters

torch = pytest.importorskip('torch')
transformers = pytest.importorskip('transformers')
peft = pytest.importorskip('peft')


def seed(rng) -> int:
  return int(rng.integers(1 << 30))


def token_ids(rng, n=3):
  return sorted(rng.choice(TINY['vocab_size'], n, replace=False).tolist())


def adapted(rng, ids, **fields):
  """A random LoRA model of TINY's shape whose rows of `ids` train, every trained parameter
  drawn at random (the adapters as test_lora draws them)."""
  config = small_config(vocab_size=TINY['vocab_size'], init_std=0.2, peft='lora', lora_rank=2,
                        trainable_tokens=','.join(map(str, ids)), **fields)
  model = registry.build(config, rngs=nnx.Rngs(seed(rng)))
  randomise_adapters(model, rng)
  for _, variable in nnx.to_flat_state(nnx.state(model, TokenRowsParam)):
    variable.set_value(jnp.asarray(rng.normal(0.0, 0.3, variable.shape), jnp.float32))
  return model


def ids_with(rng, listed, shape=(2, 12)):
  """Random ids with every listed token among them."""
  ids = rng.integers(0, TINY['vocab_size'], shape)
  ids[0, :len(listed)] = listed
  return ids


@pytest.mark.parametrize('tied', [False, True])
def test_token_rows_load_in_peft_and_back_and_merge(tied, rng, tmp_path):
  listed = token_ids(rng)
  model = adapted(rng, listed, tie_embeddings=tied)
  hf.save(lora.base_model(model), str(tmp_path / 'base'))
  adapters.save(model, str(tmp_path / 'adapter'))
  theirs = peft.PeftModel.from_pretrained(
      transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path / 'base')),
      str(tmp_path / 'adapter')).eval()
  ids = ids_with(rng, listed)
  expected = hf_logits(theirs, ids)
  ours = np.asarray(model(jnp.asarray(ids)))
  np.testing.assert_allclose(ours, expected, atol=1e-4, rtol=0)
  without_rows = nnx.clone(model)
  for _, variable in nnx.to_flat_state(nnx.state(without_rows, TokenRowsParam)):
    variable.set_value(jnp.zeros_like(variable.get_value()))
  assert np.abs(np.asarray(without_rows(jnp.asarray(ids))) - expected).max() > 0.1  # They count.

  back = adapters.load(hf.load(str(tmp_path / 'base')), str(tmp_path / 'adapter'))
  assert back.config.trainable_tokens == model.config.trainable_tokens
  np.testing.assert_allclose(np.asarray(back(jnp.asarray(ids))), expected, atol=1e-4, rtol=0)
  np.testing.assert_allclose(np.asarray(lora.merge(model)(jnp.asarray(ids))), ours, atol=1e-5,
                             rtol=0)


def test_peft_folder_with_token_rows_loads(rng, tmp_path):
  listed = token_ids(rng, 2)
  # peft's rows start as the table's; B at zero, A at random.
  theirs = saved_by_peft(
      'Llama', peft.LoraConfig(task_type='CAUSAL_LM', r=2, target_modules=['q_proj'],
                               trainable_token_indices={'embed_tokens': listed,
                                                        'lm_head': listed}),
      tmp_path, seed(rng), lambda name, x: None if 'lora_A' in name else x + (
          0.3 if 'delta' in name else 0.05) * torch.randn_like(x))
  ours = adapters.load(hf.load(str(tmp_path / 'base')), str(tmp_path / 'adapter'))
  assert ours.config.trainable_tokens == ','.join(map(str, listed))
  ids = ids_with(rng, listed)
  np.testing.assert_allclose(np.asarray(ours(jnp.asarray(ids))), hf_logits(theirs, ids),
                             atol=1e-4, rtol=0)


def test_a_listed_token_reads_its_row_plus_delta_and_only_the_rows_train(rng):
  listed = token_ids(rng)
  model = adapted(rng, listed)
  trained = dict(nnx.to_flat_state(nnx.state(model, registry.trainable(model.config))))
  assert {path for path in trained if 'token_rows' in path} == {
      ('token_rows', 'embedding_xd'), ('token_rows', 'head_xd')}
  assert all(path[-1] in ('lora_a', 'lora_b') for path in trained if 'token_rows' not in path)
  table = np.asarray(model.embed.embedding[...])
  delta = np.asarray(model.token_rows.embedding_xd[...])
  ids = jnp.asarray(ids_with(rng, listed))
  got = np.asarray(model._embed(ids))
  expected = table[np.asarray(ids)]
  for i, token in enumerate(listed):
    expected[np.asarray(ids) == token] += delta[i]
  np.testing.assert_allclose(got, expected, atol=1e-6, rtol=0)


def test_bad_token_lists_and_folders_are_named_errors(rng, tmp_path):
  for fields, message in [
      (dict(trainable_tokens='3'), "trainable_tokens='3' trains rows beside a PEFT method"),
      (dict(peft='lora', trainable_tokens='3,x'), "'x' is not a token id below vocab_size=61"),
      (dict(peft='lora', trainable_tokens='61'), "'61' is not a token id below vocab_size=61"),
      (dict(peft='lora', trainable_tokens='4,4'), 'lists 4 twice'),
  ]:
    with pytest.raises(ConfigError, match=message):
      small_config(**fields)
  listed = token_ids(rng, 2)
  model = adapted(rng, listed)
  base = lora.base_model(model)
  folder = str(tmp_path / 'adapter')
  adapters.save(model, folder)
  write_config = config_rewriter(folder)
  extra = next(token for token in range(TINY['vocab_size']) if token not in listed)
  for changes, message in [
      (dict(trainable_token_indices={'norm': listed}), "names 'norm', which is not one of"),
      (dict(trainable_token_indices={'embed_tokens': listed, 'lm_head': listed[:1]}),
       'other tokens for the output head than for the embedding'),
      (dict(trainable_token_indices={'embed_tokens': 'all'}), "='all' is not a list of token"),
      (dict(trainable_token_indices={'embed_tokens': [*listed, extra],
                                     'lm_head': [*listed, extra]}),
       r'has shape \(2, 32\), not \(3, 32\)'),
  ]:
    write_config(**changes)
    with pytest.raises(CheckpointError, match=message):
      adapters.load(base, folder)
  write_config(trainable_token_indices=[listed[0], 400])
  with pytest.raises(CheckpointError, match="'400' is not a token id below vocab_size=97"):
    adapters.load(base, folder)
  assert base.token_rows is None and base.config.trainable_tokens == ''


def test_a_prompt_folder_leaves_the_token_rows_to_its_base(rng, tmp_path):
  """peft's PROMPT_TUNING folders have no place for token rows: the exported base holds them,
  so that base and folder together are our model (which exporting leaves as it was)."""
  listed = token_ids(rng)
  config = small_config(vocab_size=TINY['vocab_size'], init_std=0.2, peft='prompt',
                        prompt_tokens=2, trainable_tokens=','.join(map(str, listed)))
  model = registry.build(config, rngs=nnx.Rngs(seed(rng)))
  for _, variable in nnx.to_flat_state(nnx.state(model, registry.trainable(config))):
    variable.set_value(jnp.asarray(rng.normal(0.0, 0.3, variable.shape), jnp.float32))
  ids = jnp.asarray(ids_with(rng, listed))
  ours = np.asarray(model(ids))
  hf.save(adapters.base_model(model), str(tmp_path / 'base'))
  adapters.save(model, str(tmp_path / 'adapter'))
  theirs = peft.PeftModel.from_pretrained(
      transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path / 'base')),
      str(tmp_path / 'adapter')).eval()
  expected = hf_logits(theirs, np.asarray(ids))[:, 2:]  # After the virtual tokens'.
  np.testing.assert_allclose(ours, expected, atol=1e-4, rtol=0)
  np.testing.assert_array_equal(np.asarray(model(ids)), ours)
