"""Hugging Face checkpoints: our logits and greedy tokens against transformers' PyTorch models,
and the round trip load -> save -> transformers load.

Each case builds a tiny random model with transformers itself, so the oracle is Hugging
Face's implementation, not ours.
"""
import dataclasses
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from lmlab.models.errors import CheckpointError
from lmlab.models import hf
from lmlab.models.generation import SamplingConfig, make_generate

torch = pytest.importorskip('torch')
transformers = pytest.importorskip('transformers')

TINY = dict(vocab_size=97, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, intermediate_size=48, max_position_embeddings=64)
BLOOM_TINY = dict(vocab_size=97, hidden_size=32, n_layer=2, n_head=4)
# qk_nope_head_dim + qk_rope_head_dim != v_head_dim, so the padding of MLA's values is exercised.
DEEPSEEK_TINY = dict(TINY, num_key_value_heads=4, kv_lora_rank=16, q_lora_rank=None,
                     qk_rope_head_dim=8, qk_nope_head_dim=12, v_head_dim=10,
                     first_k_dense_replace=2, rms_norm_eps=1e-5)
# Mixtures of experts, each with experts of another width than its dense layers.
MIXTRAL_TINY = dict(TINY, num_local_experts=4, num_experts_per_tok=2)
QWEN_MOE_TINY = dict(TINY, num_experts=6, num_experts_per_tok=2, moe_intermediate_size=20,
                     num_hidden_layers=3)
BASES = {'Bloom': BLOOM_TINY, 'DeepseekV2': DEEPSEEK_TINY, 'Mixtral': MIXTRAL_TINY,
         'Qwen2Moe': dict(QWEN_MOE_TINY, shared_expert_intermediate_size=24),
         'Qwen3Moe': dict(QWEN_MOE_TINY, head_dim=16)}
DEEPSEEK_MOE = dict(num_hidden_layers=3, first_k_dense_replace=1, n_routed_experts=8,
                    num_experts_per_tok=3, moe_intermediate_size=12, n_shared_experts=2)
YARN = {'rope_type': 'yarn', 'factor': 4.0, 'original_max_position_embeddings': 16,
        'beta_fast': 32.0, 'beta_slow': 1.0}
LLAMA3 = {'rope_type': 'llama3', 'factor': 8.0, 'low_freq_factor': 1.0,
          'high_freq_factor': 4.0, 'original_max_position_embeddings': 16}
LONGROPE_FACTORS = [1.0 + 0.25 * i for i in range(4)]

CASES = {
    'llama': ('Llama', dict(rms_norm_eps=1e-5)),
    'llama-bias': ('Llama', dict(attention_bias=True, mlp_bias=True, tie_word_embeddings=True)),
    'llama-yarn': ('Llama', dict(rope_scaling=YARN, rope_theta=500.0)),
    'llama-llama3': ('Llama', dict(rope_scaling=LLAMA3)),
    'llama-linear': ('Llama', dict(rope_scaling={'rope_type': 'linear', 'factor': 2.0})),
    'llama-dynamic': ('Llama', dict(rope_scaling={'rope_type': 'dynamic', 'factor': 2.0},
                                    max_position_embeddings=8)),
    'llama-longrope': ('Llama', dict(rope_scaling={
        'rope_type': 'longrope', 'short_factor': LONGROPE_FACTORS,
        'long_factor': [2 * f for f in LONGROPE_FACTORS], 'original_max_position_embeddings': 8})),
    'qwen2': ('Qwen2', dict(tie_word_embeddings=True, rope_theta=1e6)),
    'qwen3': ('Qwen3', dict(head_dim=16)),
    'mistral': ('Mistral', dict(sliding_window=4)),
    'bloom': ('Bloom', dict(n_head=6, hidden_size=48)),  # ALiBi's non-power-of-two slopes.
    'deepseek': ('DeepseekV2', dict()),
    'deepseek-q-lora': ('DeepseekV2', dict(q_lora_rank=12, rope_theta=500.0)),
    'deepseek-yarn': ('DeepseekV2', dict(q_lora_rank=12, rope_scaling=dict(
        YARN, mscale=0.707, mscale_all_dim=0.707))),
    'deepseek-bias-tied': ('DeepseekV2', dict(attention_bias=True, mlp_bias=True,
                                              tie_word_embeddings=True)),
    'mixtral': ('Mixtral', dict(sliding_window=5)),
    'qwen2-moe': ('Qwen2Moe', dict(mlp_only_layers=[0], norm_topk_prob=True)),
    'qwen2-moe-sparse-step': ('Qwen2Moe', dict(decoder_sparse_step=2, qkv_bias=False)),
    'qwen3-moe': ('Qwen3Moe', dict(norm_topk_prob=True)),
    'deepseek-moe': ('DeepseekV2', dict(DEEPSEEK_MOE, routed_scaling_factor=1.5)),
    'deepseek-moe-grouped': ('DeepseekV2', dict(DEEPSEEK_MOE, topk_method='group_limited_greedy',
                                                n_group=4, topk_group=2, q_lora_rank=12)),
}
GENERATION_CASES = ('llama', 'qwen2', 'qwen3', 'mistral', 'bloom', 'deepseek', 'deepseek-q-lora',
                    'mixtral', 'qwen2-moe', 'qwen3-moe', 'deepseek-moe')


def hf_model(family: str, fields: dict, seed: int, head: str = 'ForCausalLM'):
  """A transformers model with every parameter drawn at random (biases and norms too)."""
  config_class = getattr(transformers, f'{family}Config')
  model_class = getattr(transformers, family + head)
  base = BASES.get(family, TINY)
  config = config_class(**{**base, **fields}, pad_token_id=0, bos_token_id=1, eos_token_id=2)
  torch.manual_seed(seed)
  model = model_class(config).float().eval()
  with torch.no_grad():
    for name, parameter in model.named_parameters():
      noise = 0.2 * torch.randn_like(parameter)
      parameter.copy_(1.0 + noise if name.endswith('norm.weight') else noise)
  return model


def saved_by_peft(family: str, peft_config, tmp_path, seed: int, redraw):
  """peft's model, under peft_config, of a random transformers `family` model saved in
  tmp_path/base; each of its trained parameters becomes redraw(name, parameter) (None: kept)
  before it is saved in tmp_path/adapter."""
  import peft
  model = hf_model(family, {}, seed)
  model.save_pretrained(tmp_path / 'base')
  theirs = peft.get_peft_model(model, peft_config).eval()
  torch.manual_seed(seed)
  with torch.no_grad():
    for name, parameter in theirs.named_parameters():
      value = redraw(name, parameter) if parameter.requires_grad else None
      if value is not None:
        parameter.copy_(value)
  theirs.save_pretrained(tmp_path / 'adapter')
  return theirs


def hf_logits(model, ids, mask=None):
  with torch.no_grad():
    out = model(torch.tensor(np.asarray(ids)),
                attention_mask=None if mask is None else torch.tensor(np.asarray(mask)))
  return out.logits.numpy()


def left_padded_batch(rng, vocab: int):
  ids = rng.integers(3, vocab, (2, 12))
  mask = np.ones_like(ids)
  mask[0, :int(rng.integers(1, 6))] = 0
  ids[mask == 0] = 0
  return ids, mask


@pytest.fixture
def checkpoint(request, rng, tmp_path):
  """(case name, transformers model, its saved directory)."""
  family, fields = CASES[request.param]
  model = hf_model(family, fields, int(rng.integers(1 << 30)))
  model.save_pretrained(tmp_path / 'hf')
  return request.param, model, str(tmp_path / 'hf')


@pytest.mark.parametrize('checkpoint', list(CASES), indirect=True)
def test_logits_match_transformers_with_left_padding(checkpoint, rng, tmp_path):
  name, model, path = checkpoint
  ours = hf.load(path)
  assert ours.config.attention_type == ('mla' if 'Deepseek' in type(model).__name__ else 'mha')
  assert (ours.config.moe_layers > 0) == ('moe' in name or name == 'mixtral')
  ids, mask = left_padded_batch(rng, model.config.vocab_size)
  expected = hf_logits(model, ids, mask)
  got = np.asarray(ours(jnp.asarray(ids), attention_mask=jnp.asarray(mask)))
  real = mask == 1
  np.testing.assert_allclose(got[real], expected[real], atol=1e-4, rtol=0)

  hf.save(ours, str(tmp_path / 'ours'))
  # Both read from files (see test_sequence_classifier_scores_match_transformers_both_ways).
  theirs, reloaded = (transformers.AutoModelForCausalLM.from_pretrained(folder).eval()
                      for folder in (path, str(tmp_path / 'ours')))
  assert type(reloaded) is type(model)
  np.testing.assert_array_equal(hf_logits(reloaded, ids, mask)[real],
                                hf_logits(theirs, ids, mask)[real])


@pytest.mark.parametrize('family, labels', [('Llama', 1), ('Qwen2', 1), ('Mistral', 3)])
def test_sequence_classifier_scores_match_transformers_both_ways(family, labels, rng, tmp_path):
  """A reward model (one label) or classifier: transformers' score of each right-padded row,
  read at its last real token, is ours at that token; saved by us, transformers loads the
  same model (pad_token_id is what tells it where each row ends)."""
  model = hf_model(family, {'num_labels': labels}, int(rng.integers(1 << 30)),
                   head='ForSequenceClassification')
  model.save_pretrained(tmp_path / 'hf')
  ours = hf.load(str(tmp_path / 'hf'))
  assert ours.config.n_labels == labels and ours.lm_head is None
  ids = rng.integers(3, model.config.vocab_size, (3, 10))
  lengths = rng.integers(1, 11, 3)
  ids[np.arange(10) >= lengths[:, None]] = 0  # pad_token_id
  with torch.no_grad():
    expected = model(torch.tensor(ids)).logits.numpy()
  scores = np.asarray(ours(jnp.asarray(ids)))
  np.testing.assert_allclose(scores[np.arange(3), lengths - 1], expected, atol=1e-4, rtol=0)

  hf.save(ours, str(tmp_path / 'ours'), pad_token_id=0)
  # Both read from files by transformers: the model built in memory can round its score head
  # differently in the last bit (seen once in 1 of 3 scores), its tensors lying elsewhere.
  theirs, reloaded = (transformers.AutoModelForSequenceClassification.from_pretrained(
      str(tmp_path / folder)).eval() for folder in ('hf', 'ours'))
  assert type(reloaded) is type(model)
  with torch.no_grad():
    np.testing.assert_array_equal(reloaded(torch.tensor(ids)).logits.numpy(),
                                  theirs(torch.tensor(ids)).logits.numpy())


@pytest.mark.parametrize('checkpoint', GENERATION_CASES, indirect=True)
def test_greedy_generation_matches_transformers(checkpoint, rng):
  _, model, path = checkpoint
  ours = hf.load(path)
  prompt = rng.integers(3, model.config.vocab_size, (2, 5))
  with torch.no_grad():
    expected = model.generate(torch.tensor(prompt), attention_mask=torch.ones(2, 5, dtype=int),
                              do_sample=False, max_new_tokens=32, eos_token_id=None)
  graphdef, params = nnx.split(ours)
  generate = make_generate(graphdef, SamplingConfig(max_new_tokens=32, temperature=0.0),
                           end_token=-1, n_valid=model.config.vocab_size)
  got = generate(params, jnp.asarray(prompt), jax.random.key(0))
  np.testing.assert_array_equal(np.asarray(got), expected[:, 5:].numpy())


def test_sharded_checkpoint_loads(rng, tmp_path):
  model = hf_model('Llama', {}, int(rng.integers(1 << 30)))
  model.save_pretrained(tmp_path / 'hf', max_shard_size='20KB')
  assert (tmp_path / 'hf' / 'model.safetensors.index.json').exists()
  ids = rng.integers(0, 97, (1, 9))
  np.testing.assert_allclose(np.asarray(hf.load(str(tmp_path / 'hf'))(jnp.asarray(ids))),
                             hf_logits(model, ids), atol=1e-4, rtol=0)


def test_bfloat16_parameters_load_from_a_bfloat16_checkpoint(rng, tmp_path):
  model = hf_model('Qwen2', {}, int(rng.integers(1 << 30))).to(torch.bfloat16)
  model.save_pretrained(tmp_path / 'hf')
  ours = hf.load(str(tmp_path / 'hf'), dtype='bfloat16')
  embedding = ours.embed.embedding[...]
  assert embedding.dtype == jnp.bfloat16
  np.testing.assert_array_equal(
      np.asarray(embedding, np.float32),
      model.model.embed_tokens.weight.detach().float().numpy())


def test_newer_rope_parameters_form_is_read(rng, tmp_path):
  model = hf_model('Llama', dict(rope_scaling=YARN, rope_theta=500.0), int(rng.integers(1 << 30)))
  path = str(tmp_path / 'hf')
  model.save_pretrained(path)
  with open(os.path.join(path, 'config.json')) as f:
    hf_config = json.load(f)
  hf_config.pop('rope_scaling', None)
  hf_config.pop('rope_theta', None)
  hf_config['rope_parameters'] = {**YARN, 'rope_theta': 500.0}
  with open(os.path.join(path, 'config.json'), 'w') as f:
    json.dump(hf_config, f)
  ids = rng.integers(0, 97, (1, 20))
  np.testing.assert_allclose(np.asarray(hf.load(path)(jnp.asarray(ids))), hf_logits(model, ids),
                             atol=1e-4, rtol=0)


def saved_with_config_editor(model, folder):
  """(path, write_config): the saved checkpoint, and a function that rewrites its
  config.json as the saved one with some fields changed."""
  model.save_pretrained(folder)
  path = str(folder)
  with open(os.path.join(path, 'config.json')) as f:
    saved = json.load(f)

  def write_config(**changes):
    with open(os.path.join(path, 'config.json'), 'w') as f:
      json.dump({**saved, **changes}, f)

  return path, write_config


def test_bad_checkpoints_are_named_errors(rng, tmp_path):
  model = hf_model('Llama', {}, int(rng.integers(1 << 30)))
  path, write_config = saved_with_config_editor(model, tmp_path / 'hf')
  write_config(architectures=['GPTNeoXForCausalLM'])
  with pytest.raises(CheckpointError, match='GPTNeoXForCausalLM.*not supported'):
    hf.load(path)
  write_config(hidden_act='gelu')
  with pytest.raises(CheckpointError, match='hidden_act'):
    hf.load(path)
  write_config(num_hidden_layers=3)
  with pytest.raises(CheckpointError, match='model.layers.2'):
    hf.load(path)
  write_config(num_hidden_layers=1)
  with pytest.raises(CheckpointError, match='no place'):
    hf.load(path)
  write_config(intermediate_size=40)
  with pytest.raises(CheckpointError, match='shape'):
    hf.load(path)


def test_save_refuses_what_no_architecture_expresses_and_existing_folders(rng, tmp_path):
  model = hf_model('Llama', {}, int(rng.integers(1 << 30)))
  model.save_pretrained(tmp_path / 'hf')
  ours = hf.load(str(tmp_path / 'hf'))
  with pytest.raises(CheckpointError, match='not an empty directory'):
    hf.save(ours, str(tmp_path / 'hf'))
  graphdef, params = nnx.split(ours)
  post_ln = nnx.merge(graphdef, params)
  post_ln.config = dataclasses.replace(ours.config, norm_placement='post')
  with pytest.raises(CheckpointError, match='norm_placement'):
    hf.save(post_ln, str(tmp_path / 'out'))
  assert not (tmp_path / 'out').exists()


def test_qwen_dual_chunk_config_turns_on_dca(rng, tmp_path):
  """transformers ignores dual_chunk_attention_config; within one chunk DCA is plain attention,
  so the logits still match there."""
  model = hf_model('Qwen2', {}, int(rng.integers(1 << 30)))
  model.save_pretrained(tmp_path / 'hf')
  path = str(tmp_path / 'hf')
  with open(os.path.join(path, 'config.json')) as f:
    hf_config = json.load(f)
  hf_config['dual_chunk_attention_config'] = {'chunk_size': 16, 'local_size': 4}
  with open(os.path.join(path, 'config.json'), 'w') as f:
    json.dump(hf_config, f)
  ours = hf.load(path)
  assert (ours.config.dca_chunk_size, ours.config.dca_local_size) == (16, 4)
  ids = rng.integers(0, 97, (2, 16))
  np.testing.assert_allclose(np.asarray(ours(jnp.asarray(ids))), hf_logits(model, ids),
                             atol=1e-4, rtol=0)
