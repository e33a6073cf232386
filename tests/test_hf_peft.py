"""LoRA adapters as Hugging Face peft folders (models/hf/peft.py): our logits against
transformers with peft itself, both ways, and the named errors of bad folders."""
import dataclasses
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from conftest import config_rewriter, small_config
from lmlab.models import hf, registry
from lmlab.models.config import without_peft
from lmlab.models.errors import CheckpointError
from lmlab.models.hf import peft as hf_peft
from lmlab.models.hf import peft_folders, safetensors_files
from lmlab.models.lora import add_lora
from test_hf import TINY, hf_logits, saved_by_peft
from test_lora import randomise_adapters

torch = pytest.importorskip('torch')
transformers = pytest.importorskip('transformers')
peft = pytest.importorskip('peft')

# (transformers family, our base config's fields, lora fields); attention and MLP targets.
CASES = {
    'llama': ('Llama', dict(), dict(lora_targets='q,v,gate,down', lora_rank=4)),
    'qwen2-rslora': ('Qwen2', dict(qkv_bias=True, norm_eps=1e-6),
                     dict(lora_targets='q,k,o,up', lora_rank=3, lora_alpha=5.0,
                          lora_rslora=True)),
}


def random_ids(rng, shape=(2, 9)):
  return rng.integers(0, TINY['vocab_size'], shape)


def ours_logits(model, ids):
  return np.asarray(model(jnp.asarray(ids)))


@pytest.mark.parametrize('case', list(CASES))
def test_save_lora_folder_loads_in_peft(case, rng, tmp_path):
  family, base_fields, lora_fields = CASES[case]
  base_config = small_config(vocab_size=TINY['vocab_size'], init_std=0.2, **base_fields)
  base = registry.build(base_config, rngs=nnx.Rngs(int(rng.integers(1 << 30))))
  config = dataclasses.replace(base_config, peft='lora', **lora_fields).validate()
  adapted = add_lora(nnx.clone(base), config, rngs=nnx.Rngs(int(rng.integers(1 << 30))))
  randomise_adapters(adapted, rng)
  hf.save(base, str(tmp_path / 'base'))
  hf_peft.save_lora(adapted, str(tmp_path / 'adapter'), base_model_name_or_path='base')

  theirs = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path / 'base'))
  assert type(theirs).__name__ == f'{family}ForCausalLM'
  theirs = peft.PeftModel.from_pretrained(theirs, str(tmp_path / 'adapter')).eval()
  ids = random_ids(rng)
  expected = hf_logits(theirs, ids)
  assert np.abs(ours_logits(base, ids) - expected).max() > 0.1  # The adapters count.
  np.testing.assert_allclose(ours_logits(adapted, ids), expected, atol=1e-4, rtol=0)


@pytest.mark.parametrize('case', list(CASES))
def test_peft_folder_loads_with_load_lora(case, rng, tmp_path):
  family, _, lora_fields = CASES[case]
  lora_config = peft.LoraConfig(
      task_type='CAUSAL_LM', r=lora_fields['lora_rank'],
      lora_alpha=lora_fields.get('lora_alpha', 16.0),
      use_rslora=lora_fields.get('lora_rslora', False),
      target_modules=[f'{name}_proj' for name in lora_fields['lora_targets'].split(',')])
  theirs = saved_by_peft(family, lora_config, tmp_path, int(rng.integers(1 << 30)),
                         lambda _, x: 0.2 * torch.randn_like(x))

  base = hf.load(str(tmp_path / 'base'))
  ours = hf_peft.load_lora(base, str(tmp_path / 'adapter'))
  assert ours.config == dataclasses.replace(base.config, peft='lora', **lora_fields)
  assert not jax.tree.leaves(nnx.state(base, nnx.LoRAParam))  # The base model is left plain.
  ids = random_ids(rng)
  expected = hf_logits(theirs, ids)
  assert np.abs(ours_logits(base, ids) - expected).max() > 0.1
  np.testing.assert_allclose(ours_logits(ours, ids), expected, atol=1e-4, rtol=0)


@pytest.fixture
def adapter(rng, tmp_path):
  """(base model, a peft folder of adapters for it, a function that rewrites that folder's
  adapter_config.json with some fields changed)."""
  base = registry.build(small_config(vocab_size=TINY['vocab_size']),
                        rngs=nnx.Rngs(int(rng.integers(1 << 30))))
  config = dataclasses.replace(base.config, peft='lora', lora_targets='q,down')
  adapted = add_lora(nnx.clone(base), config, rngs=nnx.Rngs(0))
  folder = str(tmp_path / 'adapter')
  hf_peft.save_lora(adapted, folder)
  return base, folder, config_rewriter(folder)


def test_bad_adapter_config_is_a_named_error(adapter):
  base, folder, write_config = adapter
  for changes, message in [
      (dict(peft_type='IA3'), "peft_type='IA3' is not LORA"),
      (dict(r=0), 'r=0 must be positive'),
      (dict(r=2.5), 'r=2.5 is not an integer'),
      (dict(use_dora=True), 'use_dora=True is not supported'),
      (dict(target_modules=['q_proj', 'lm_head']), "'lm_head', which is not among the layers"),
      (dict(target_modules=['q_proj', 'qkv']), "entry 'qkv' names no module"),
      (dict(target_modules=['layers.0.self_attn.q_proj']), "'q' layers of some blocks only"),
      (dict(target_modules='.*q_proj'), 'is not a list of module names'),
      (dict(lora_dropout=1.5), 'lora_dropout=1.5 must be in'),
  ]:
    write_config(**changes)
    with pytest.raises(CheckpointError, match=f'adapter_config.json: .*{message}'):
      hf_peft.load_lora(base, folder)
  write_config(target_modules=['q_proj'])  # down_proj's tensors are left over.
  with pytest.raises(CheckpointError, match='4 tensors that target_modules does not account'):
    hf_peft.load_lora(base, folder)
  write_config(target_modules=['q_proj', 'down_proj', 'up_proj'])
  with pytest.raises(CheckpointError, match="no tensor 'base_model.model.model.layers.0.mlp.up"):
    hf_peft.load_lora(base, folder)
  os.remove(os.path.join(folder, peft_folders.CONFIG_FILE))
  with pytest.raises(CheckpointError, match='has no adapter_config.json'):
    hf_peft.load_lora(base, folder)


def test_adapter_of_another_base_is_a_named_error(adapter, rng):
  base, folder, _ = adapter
  other = registry.build(dataclasses.replace(base.config, ffn_dim=40), rngs=nnx.Rngs(0))
  with pytest.raises(CheckpointError, match=r'mlp.down_proj.lora_A.weight.*shape \(8, 48\), '
                                            r'not \(8, 40\).*another base'):
    hf_peft.load_lora(other, folder)
  tensors = safetensors_files.Checkpoint(folder, [peft_folders.WEIGHTS_FILE])
  kept = {name: np.asarray(tensors.read(name)) for name in tensors.names()
          if 'layers.1.self_attn' not in name}
  os.remove(os.path.join(folder, peft_folders.WEIGHTS_FILE))
  safetensors_files.write(os.path.join(folder, peft_folders.WEIGHTS_FILE), kept)
  with pytest.raises(CheckpointError, match="has no tensor 'base_model.model.model.layers.1"):
    hf_peft.load_lora(base, folder)


def test_plain_and_adapted_models_are_not_mistaken_for_each_other(tmp_path):
  config = small_config(peft='lora')
  model, plain = (registry.build(c, rngs=nnx.Rngs(0)) for c in (config, without_peft(config)))
  with pytest.raises(CheckpointError, match='merge them into it first'):
    hf.save(model, str(tmp_path / 'hf'))
  with pytest.raises(CheckpointError, match="this model has peft=''"):
    hf_peft.save_lora(plain, str(tmp_path / 'adapter'))
  assert not os.listdir(tmp_path)
  hf.save(plain, str(tmp_path / 'hf'))
  with pytest.raises(CheckpointError, match="load reads a plain model, not peft='lora'"):
    hf.load(str(tmp_path / 'hf'), peft='lora')
