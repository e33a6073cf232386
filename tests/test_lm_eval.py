"""lmlab's lm-evaluation-harness backend against the harness's own hf backend (transformers),
on the same weights written by models.hf.save and local tasks over JSONL files the test
writes: multiple choice, generation until stop strings, and rolling log-likelihood of texts;
and the built-in tasks' acc, acc_norm and bits per byte against the harness's."""
import glob
import json
import math
import sys
import unicodedata

import numpy as np
import pytest

from conftest import random_code_points
from test_hf import hf_model
from test_hf_tokenizer import QWEN2_SPLIT, random_sentences, trained_tokenizer

lm_eval = pytest.importorskip('lm_eval')
torch = pytest.importorskip('torch')
transformers = pytest.importorskip('transformers')

END_OF_TEXT = '<|endoftext|>'
TASKS = {
    'choose': {'output_type': 'multiple_choice', 'doc_to_text': '{{context}}',
               'doc_to_choice': '{{choices}}', 'doc_to_target': '{{label}}',
               'metric_list': [{'metric': 'acc'}, {'metric': 'acc_norm'}]},
    'complete': {'output_type': 'generate_until', 'doc_to_text': '{{prompt}}',
                 'doc_to_target': '{{answer}}',
                 'generation_kwargs': {'until': ['\n', '.'], 'max_gen_toks': 10,
                                       'do_sample': False},
                 'metric_list': [{'metric': 'exact_match'}]},
    'read': {'output_type': 'loglikelihood_rolling', 'doc_to_text': '',
             'doc_to_target': '{{text}}',
             'metric_list': [{'metric': m} for m in ('word_perplexity', 'byte_perplexity',
                                                     'bits_per_byte')]},
}


def write_tasks(folder, rng):
  """Task YAMLs (JSON is YAML) over JSONL files of random documents."""
  sentence = lambda: random_sentences(rng, 1)[0]
  documents = {
      'choose': [{'context': sentence() if i else '', 'label': int(rng.integers(3)),
                  'choices': [sentence() for _ in range(3)]} for i in range(6)],
      'complete': [{'prompt': sentence(), 'answer': sentence()} for _ in range(3)],
      # NFC text: transformers gives a Qwen2 tokenizer Qwen2's NFC normaliser, and ours
      # leaves normalising to the caller (data/hf_tokenizer.py).
      'read': [{'text': unicodedata.normalize(
          'NFC', ' '.join(random_sentences(rng, 8)) + random_code_points(rng, 5))}
               for _ in range(3)],
  }
  for name, spec in TASKS.items():
    data = folder / f'{name}.jsonl'
    data.write_text(''.join(json.dumps(d) + '\n' for d in documents[name]), encoding='utf-8')
    task = {'task': f'lmlab_test_{name}', 'dataset_path': 'json', 'test_split': 'test',
            'dataset_kwargs': {'data_files': {'test': str(data)}}, **spec}
    (folder / f'{name}.yaml').write_text(json.dumps(task), encoding='utf-8')
  return documents


def exported(family, rng, tmp_path):
  """A random transformers model of `family` over a trained byte-level BPE tokenizer, loaded
  by lmlab and written back by models.hf.save with the tokenizer's files; its output layer is
  scaled up so that greedy choices are not near ties. (transformers reads a Qwen2 folder's
  tokenizer with Qwen2's own split pattern, whatever tokenizer.json says: it is trained with
  that pattern.)"""
  from lmlab.models import hf
  tokenizer = trained_tokenizer(rng, QWEN2_SPLIT if family == 'Qwen2' else None)
  eot = tokenizer.token_to_id(END_OF_TEXT)
  model = hf_model(family, dict(vocab_size=tokenizer.get_vocab_size(),
                                max_position_embeddings=64, tie_word_embeddings=False),
                   int(rng.integers(1 << 30)))
  with torch.no_grad():
    model.lm_head.weight.mul_(6.0)
  model.save_pretrained(tmp_path / 'transformers')
  folder = tmp_path / 'ours'
  hf.save(hf.load(str(tmp_path / 'transformers')), str(folder))
  config = json.loads((folder / 'config.json').read_text())
  config.update(bos_token_id=eot, eos_token_id=eot, pad_token_id=eot)
  (folder / 'config.json').write_text(json.dumps(config))
  transformers.PreTrainedTokenizerFast(
      tokenizer_object=tokenizer, bos_token=END_OF_TEXT, eos_token=END_OF_TEXT,
      pad_token=END_OF_TEXT).save_pretrained(folder)
  return str(folder)


def evaluate(model, tasks_folder, tasks=tuple(TASKS), **model_kwargs):
  from lm_eval.tasks import TaskManager
  return lm_eval.simple_evaluate(
      model=model, model_args=model_kwargs, tasks=[f'lmlab_test_{n}' for n in tasks],
      task_manager=TaskManager(include_path=str(tasks_folder), include_defaults=False),
      log_samples=True,
      batch_size=3, random_seed=0, numpy_random_seed=0, torch_random_seed=0,
      fewshot_random_seed=0)


@pytest.fixture
def offline(tmp_path, monkeypatch):
  for name, value in [('HF_DATASETS_OFFLINE', '1'), ('HF_HUB_OFFLINE', '1'),
                      ('HF_DATASETS_CACHE', str(tmp_path / 'datasets'))]:
    monkeypatch.setenv(name, value)


@pytest.mark.parametrize('family', ['Llama', 'Qwen2'])
def test_backend_matches_the_harness_hf_backend(family, rng, tmp_path, offline):
  from lmlab.training.lm_eval_model import LmlabLM
  from lmlab.training import eval_tasks
  folder = exported(family, rng, tmp_path)
  tasks_folder = tmp_path / 'tasks'
  tasks_folder.mkdir()
  documents = write_tasks(tasks_folder, rng)
  theirs = evaluate('hf', tasks_folder, pretrained=folder, dtype='float32', device='cpu',
                    max_length=64)
  ours_model = LmlabLM(hf_checkpoint=folder, batch_size=3, max_length=64)
  ours = evaluate(ours_model, tasks_folder)
  for name in TASKS:
    task = f'lmlab_test_{name}'
    ours_samples, their_samples = (sorted(r['samples'][task], key=lambda s: s['doc_id'])
                                   for r in (ours, theirs))
    assert len(ours_samples) == len(their_samples) == len(documents[name])
    for mine, reference in zip(ours_samples, their_samples):
      if name == 'complete':
        assert mine['filtered_resps'] == reference['filtered_resps']
        continue
      got, expected = (np.array([r[0][0] if name == 'choose' else r[0] for r in s['resps']],
                                np.float64) for s in (mine, reference))
      np.testing.assert_allclose(got, expected, atol=1e-4, rtol=1e-5)
    for metric, value in theirs['results'][task].items():
      if metric.split(',')[0] in ('acc', 'acc_norm', 'exact_match'):
        assert ours['results'][task][metric] == value, metric
      elif metric.endswith(',none') and 'stderr' not in metric:
        assert ours['results'][task][metric] == pytest.approx(value, rel=1e-5), metric
  # The built-in tasks score as the harness does: its acc, acc_norm and bits per byte.
  multiple_choice = tasks_folder / 'choose.jsonl'
  suite = eval_tasks.Suite(
      eval_tasks.parse(f'bpb,mc:{multiple_choice}'), ours_model.tokenizer,
      lambda: [d['text'] for d in documents['read']], batch_size=3, max_len=64)
  built_in = suite.run(ours_model.loaded.graphdef, ours_model.loaded.params)
  harness = theirs['results']
  assert built_in['mc_choose']['acc'] == harness['lmlab_test_choose']['acc,none']
  assert built_in['mc_choose']['acc_norm'] == harness['lmlab_test_choose']['acc_norm,none']
  assert built_in['bpb']['bits_per_byte'] == pytest.approx(
      harness['lmlab_test_read']['bits_per_byte,none'], rel=1e-5)
  assert not math.isnan(built_in['bpb']['word_perplexity'])


def test_lmlab_eval_command_on_a_workdir(rng, tmp_path, offline, monkeypatch):
  """`lmlab-eval` (the harness's command line with our backend) on a training run's workdir
  made from the exported folder reports the hf backend's accuracy on the folder."""
  from lmlab.training import lm_eval_command
  from lmlab.training import run as run_lib
  from lmlab.training.config import TrainConfig
  folder = exported('Llama', rng, tmp_path)
  workdir = str(tmp_path / 'run')
  run_lib.hf_to_workdir(folder, TrainConfig(workdir=workdir), [])
  tasks_folder = tmp_path / 'tasks'
  tasks_folder.mkdir()
  write_tasks(tasks_folder, rng)
  theirs = evaluate('hf', tasks_folder, pretrained=folder, dtype='float32', device='cpu',
                    max_length=64, tasks=['choose'])['results']['lmlab_test_choose']
  monkeypatch.setattr(sys, 'argv', [
      'lmlab-eval', 'run', '--model', 'lmlab', '--model_args',
      f'workdir={workdir},max_length=64', '--tasks', 'lmlab_test_choose', '--include_path',
      str(tasks_folder), '--output_path', str(tmp_path / 'out')])
  lm_eval_command.main()
  [path] = glob.glob(str(tmp_path / 'out' / '**' / 'results_*.json'), recursive=True)
  with open(path) as f:
    ours = json.load(f)['results']['lmlab_test_choose']
  assert (ours['acc,none'], ours['acc_norm,none']) == (theirs['acc,none'],
                                                       theirs['acc_norm,none'])


def test_lmlab_eval_without_the_harness_says_how_to_install_it(monkeypatch, capsys):
  from lmlab import training
  from lmlab.training import lm_eval_command
  monkeypatch.setitem(sys.modules, 'lm_eval', None)
  monkeypatch.delitem(sys.modules, 'lmlab.training.lm_eval_model', raising=False)
  monkeypatch.delattr(training, 'lm_eval_model', raising=False)
  with pytest.raises(SystemExit) as exit_:
    lm_eval_command.main()
  assert exit_.value.code == 1
  assert "pip install 'lmlab[eval]'" in capsys.readouterr().err
