"""BERT and RoBERTa against transformers' PyTorch models: every layer's hidden states, the
pooler and both heads on padded batches with token types, and the round trip
load -> save -> transformers load.

Each case builds a tiny random model with transformers itself, so the oracle is Hugging
Face's implementation, not ours.
"""
import json
import os

import jax.numpy as jnp
import numpy as np
import pytest

from lmlab.models.errors import CheckpointError
from lmlab.models import hf

torch = pytest.importorskip('torch')
transformers = pytest.importorskip('transformers')

TINY = dict(vocab_size=97, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
            intermediate_size=48, max_position_embeddings=40, type_vocab_size=3,
            hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
CASES = {
    'bert-model': ('BertModel', 'Bert', {}),
    'bert-masked-lm': ('BertForMaskedLM', 'Bert', dict(hidden_act='relu')),
    'bert-masked-lm-untied': ('BertForMaskedLM', 'Bert', dict(tie_word_embeddings=False)),
    'bert-pretraining': ('BertForPreTraining', 'Bert', dict(layer_norm_eps=1e-5)),
    'roberta-masked-lm': ('RobertaForMaskedLM', 'Roberta',
                          dict(pad_token_id=1, type_vocab_size=1, max_position_embeddings=42)),
}


def hf_model(architecture: str, family: str, fields: dict, seed: int):
  """A transformers model with every parameter drawn at random (biases and norms too)."""
  config = getattr(transformers, f'{family}Config')(**{**TINY, **fields})
  torch.manual_seed(seed)
  model = getattr(transformers, architecture)(config).float().eval()
  with torch.no_grad():
    for name, parameter in model.named_parameters():
      noise = 0.2 * torch.randn_like(parameter)
      parameter.copy_(1.0 + noise if 'LayerNorm.weight' in name or 'layer_norm.weight' in name
                      else noise)
  return model


def padded_batch(rng, config):
  """ids, token types and a mask [3, 12]: a full row, a right-padded and a left-padded one;
  padding holds the pad id, as a tokenizer writes it (RoBERTa derives positions from it)."""
  ids = rng.integers(3, config.vocab_size, (3, 12))
  types = rng.integers(0, config.type_vocab_size, (3, 12))
  mask = np.ones_like(ids)
  mask[1, int(rng.integers(2, 11)):] = 0
  mask[2, :int(rng.integers(1, 10))] = 0
  ids[mask == 0] = config.pad_token_id
  return ids, types, mask


def hf_outputs(model, ids, types, mask) -> dict:
  """Every output of the model and of its encoder, as numpy arrays."""
  inputs = dict(input_ids=torch.tensor(ids), token_type_ids=torch.tensor(types),
                attention_mask=torch.tensor(mask), output_hidden_states=True)
  with torch.no_grad():
    encoder = model.base_model(**inputs)
    full = model(**inputs)
  out = {'last_hidden_state': encoder.last_hidden_state.numpy(),
         'hidden_states': [h.numpy() for h in encoder.hidden_states]}
  if getattr(encoder, 'pooler_output', None) is not None:
    out['pooler_output'] = encoder.pooler_output.numpy()
  logits = getattr(full, 'prediction_logits', None)
  logits = getattr(full, 'logits', None) if logits is None else logits
  if logits is not None:
    out['mlm_logits'] = logits.numpy()
  if getattr(full, 'seq_relationship_logits', None) is not None:
    out['nsp_logits'] = full.seq_relationship_logits.numpy()
  return out


@pytest.fixture
def checkpoint(request, rng, tmp_path):
  """(transformers model, its saved directory)."""
  model = hf_model(*CASES[request.param], int(rng.integers(1 << 30)))
  model.save_pretrained(tmp_path / 'hf')
  return model, str(tmp_path / 'hf')


@pytest.mark.parametrize('checkpoint', list(CASES), indirect=True)
def test_every_output_matches_transformers_with_padding_and_token_types(checkpoint, rng,
                                                                        tmp_path):
  model, path = checkpoint
  ours = hf.load(path)
  ids, types, mask = padded_batch(rng, model.config)
  expected = hf_outputs(model, ids, types, mask)
  got = ours(jnp.asarray(ids), jnp.asarray(types), jnp.asarray(mask), output_hidden_states=True)
  real = mask == 1
  assert len(got.hidden_states) == len(expected['hidden_states']) == 3
  for ours_btd, theirs_btd in zip(got.hidden_states, expected['hidden_states']):
    np.testing.assert_allclose(np.asarray(ours_btd)[real], theirs_btd[real], atol=1e-4, rtol=0)
  np.testing.assert_allclose(np.asarray(got.last_hidden_state)[real],
                             expected['last_hidden_state'][real], atol=1e-4, rtol=0)
  first_is_real = real[:, 0]  # The pooler reads the first token, padding in a left-padded row.
  for name in ('pooler_output', 'nsp_logits'):
    assert (getattr(got, name) is None) == (name not in expected), name
    if name in expected:
      np.testing.assert_allclose(np.asarray(getattr(got, name))[first_is_real],
                                 expected[name][first_is_real], atol=1e-4, rtol=0)
  assert (got.mlm_logits is None) == ('mlm_logits' not in expected)
  if got.mlm_logits is not None:
    np.testing.assert_allclose(np.asarray(got.mlm_logits)[real], expected['mlm_logits'][real],
                               atol=1e-4, rtol=0)

  hf.save(ours, str(tmp_path / 'ours'))
  architecture = model.config.architectures[0]
  with open(tmp_path / 'ours' / 'config.json') as f:
    assert json.load(f)['architectures'] == [architecture]
  reloaded = getattr(transformers, architecture).from_pretrained(str(tmp_path / 'ours')).eval()
  again = hf_outputs(reloaded, ids, types, mask)
  for name, value in expected.items():
    np.testing.assert_array_equal(np.asarray(again[name]), np.asarray(value), err_msg=name)


def test_bert_refuses_what_it_does_not_implement(rng, tmp_path):
  model = hf_model('BertModel', 'Bert', dict(position_embedding_type='relative_key'),
                   int(rng.integers(1 << 30)))
  model.save_pretrained(tmp_path / 'hf')
  with pytest.raises(CheckpointError, match='position_embedding_type'):
    hf.load(str(tmp_path / 'hf'))


def test_tensorflow_era_layer_norm_names_load(rng, tmp_path):
  """The original BERT releases name LayerNorm parameters gamma/beta; transformers reads them
  as weight/bias, and so must we. Saving writes today's names."""
  from safetensors.torch import load_file, save_file
  model = hf_model('BertForPreTraining', 'Bert', {}, int(rng.integers(1 << 30)))
  model.save_pretrained(tmp_path / 'hf')
  weights = tmp_path / 'hf' / 'model.safetensors'
  renamed = {}
  for name, tensor in load_file(weights).items():
    for today, legacy in (('LayerNorm.weight', 'LayerNorm.gamma'),
                          ('LayerNorm.bias', 'LayerNorm.beta')):
      if name.endswith(today):
        name = name[:-len(today)] + legacy
    renamed[name] = tensor
  assert sum(name.endswith(('.gamma', '.beta')) for name in renamed) == 2 * (1 + 2 * 2 + 1)
  save_file(renamed, weights, metadata={'format': 'pt'})

  ids, types, mask = padded_batch(rng, model.config)
  expected = hf_outputs(model, ids, types, mask)
  ours = hf.load(str(tmp_path / 'hf'))
  got = ours(jnp.asarray(ids), jnp.asarray(types), jnp.asarray(mask))
  real = mask == 1
  np.testing.assert_allclose(np.asarray(got.mlm_logits)[real], expected['mlm_logits'][real],
                             atol=1e-4, rtol=0)
  np.testing.assert_allclose(np.asarray(got.nsp_logits)[real[:, 0]],
                             expected['nsp_logits'][real[:, 0]], atol=1e-4, rtol=0)

  hf.save(ours, str(tmp_path / 'ours'))
  written = load_file(tmp_path / 'ours' / 'model.safetensors')
  assert not any(name.endswith(('.gamma', '.beta')) for name in written)
  assert 'bert.embeddings.LayerNorm.weight' in written

  renamed['bert.embeddings.LayerNorm.weight'] = renamed['bert.embeddings.LayerNorm.gamma'].clone()
  save_file(renamed, weights, metadata={'format': 'pt'})
  with pytest.raises(CheckpointError, match='both'):
    hf.load(str(tmp_path / 'hf'))


def test_eval_of_a_checkpoint_reports_its_masked_lm_and_next_sentence_losses(rng, tmp_path):
  """main.py --mode=eval --hf_checkpoint scores BERT's pre-training objective on held-out
  pairs; transformers, given the same batches, computes the same losses and accuracies."""
  from test_main import run_main
  from lmlab.training.config import TrainConfig
  from lmlab.training.objectives import BertPretraining, mlm_capacity
  words = ['alpha', 'beta', 'gamma', 'delta', 'def', 'return', 'value', 'list']
  vocab = ['[PAD]', '[UNK]', '[CLS]', '[SEP]', '[MASK]', '.', *words]
  model = hf_model('BertForPreTraining', 'Bert', dict(vocab_size=len(vocab)),
                   int(rng.integers(1 << 30)))
  path = str(tmp_path / 'hf')
  model.save_pretrained(path)
  with open(os.path.join(path, 'vocab.txt'), 'w') as f:
    f.write('\n'.join(vocab) + '\n')
  corpus = tmp_path / 'corpus'
  corpus.mkdir()
  for i in range(4):
    (corpus / f'doc{i}.txt').write_text(' '.join(rng.choice(words[:5 + i], 300)) + '.')
  run = TrainConfig(workdir=str(tmp_path / 'eval'), data=str(corpus), seq_len=32, batch_size=4,
                    eval_batches=2, tokenizer=os.path.join(path, 'vocab.txt'), objective='bert')
  out = run_main('--mode=eval', f'--hf_checkpoint={path}', f'--workdir={run.workdir}',
                 f'--data={corpus}', '--seq_len=32', '--batch_size=4', '--eval_batches=2').stdout
  reported = {name: float(value) for name, value in
              (item.split(' ') for item in out.strip().rpartition(': ')[2].split(', '))}

  task = BertPretraining(run, hf.read_config(path)[1])
  task.load_data()
  expected = {}
  for i in range(run.eval_batches):
    batch = task.val_batches.batch(i)
    with torch.no_grad():
      outputs = model(input_ids=torch.tensor(batch['inputs']),
                      token_type_ids=torch.tensor(batch['token_type_ids']),
                      attention_mask=torch.tensor(batch['attention_mask']))
    selected = batch['labels'] >= 0
    scored = selected & (np.cumsum(selected, axis=1) <= mlm_capacity(run.seq_len))
    for name, logits, labels in (
        ('mlm', outputs.prediction_logits.numpy()[scored], batch['labels'][scored]),
        ('nsp', outputs.seq_relationship_logits.numpy(), batch['is_random_next'])):
      log_probs = torch.log_softmax(torch.tensor(logits), -1).numpy()
      batch_metrics = {f'eval_{name}_loss': -log_probs[np.arange(len(labels)), labels].mean(),
                       f'eval_{name}_accuracy': (logits.argmax(-1) == labels).mean()}
      for key, value in batch_metrics.items():
        expected[key] = expected.get(key, 0.0) + value / run.eval_batches
  expected['eval_loss'] = expected['eval_mlm_loss'] + expected['eval_nsp_loss']
  assert set(reported) == set(expected)
  for name, value in expected.items():
    assert abs(reported[name] - value) < 2e-4, (name, reported[name], value)
