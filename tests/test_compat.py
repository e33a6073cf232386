"""Workdirs written by earlier versions of lmlab evaluate and resume with today's code."""
import concurrent.futures
import json
import os
import shutil

import numpy as np

import main_server
from conftest import ROOT

FIXTURE = os.path.join(ROOT, 'tests', 'fixtures', 'workdir_741c381')
# The command that wrote the fixture (its README.md), without --steps.
ARGS = ['--set', 'd_model=32', '--set', 'n_layers=1', '--set', 'n_heads=2',
        '--set', 'n_kv_heads=1', '--set', 'ffn_dim=64', '--batch_size=4', '--seq_len=16',
        '--log_every=1', '--eval_every=100', '--eval_batches=1', '--warmup_steps=2',
        '--schedule_steps=6', '--save_every=2', '--keep_checkpoints=1', '--max_new_tokens=4',
        '--val_fraction=0.25', '--workdir=run-4']


def read_metrics(path):
  with open(path) as f:
    return [json.loads(line) for line in f]


def run_main(cwd, *args):
  result = main_server.run([os.path.join(ROOT, 'main.py'), *ARGS, *args], cwd=str(cwd),
                           timeout=300)
  assert result.returncode == 0, result.stderr.decode()[-3000:]
  return result.stdout.decode()


def test_workdir_of_741c381_evaluates_and_resumes(tmp_path):
  # One copy is evaluated while another resumes (which deletes checkpoint 4), side by side: each
  # run mostly keeps one core busy.
  evaluated, resumed_copy = tmp_path / 'evaluated', tmp_path / 'resumed'
  for copy in (evaluated, resumed_copy):
    shutil.copytree(FIXTURE, copy)
  with concurrent.futures.ThreadPoolExecutor(2) as pool:
    evaluation = pool.submit(run_main, evaluated, '--mode=eval')
    pool.submit(run_main, resumed_copy, '--data=corpus', '--steps=6').result()
  written = read_metrics(os.path.join(FIXTURE, 'run-4', 'metrics.jsonl'))
  [eval_at_4] = [m['eval_loss'] for m in written if m['step'] == 4 and 'eval_loss' in m]
  [line] = [line for line in evaluation.result().splitlines()
            if line.startswith('checkpoint 4: loss ')]  # Of the run's validation split.
  printed = float(line.split()[3].rstrip(','))  # Four decimals.
  np.testing.assert_allclose(printed, eval_at_4, rtol=0, atol=5.1e-5)

  # Resumed at step 4, the run continues as the old version's uninterrupted one did (within
  # float32 rounding, so that another JAX release's reductions do not fail it).
  uninterrupted = read_metrics(os.path.join(FIXTURE, 'uninterrupted_metrics.jsonl'))
  expected = {m['step']: m for m in uninterrupted if 'loss' in m}
  resumed = {m['step']: m for m in read_metrics(resumed_copy / 'run-4' / 'metrics.jsonl')
             if 'loss' in m and m['step'] > 4}
  assert sorted(resumed) == [5, 6]
  for step, metrics in resumed.items():
    for name in ('loss', 'grad_norm', 'lr'):
      np.testing.assert_allclose(metrics[name], expected[step][name], rtol=1e-5,
                                 err_msg=f'{name} at step {step}')
