"""Meshes, logical-axis rules, multi-process runs and the MFU arithmetic.

The tests that need 8 devices live in tests/multi_device and run here in a process of their
own, started with XLA_FLAGS=--xla_force_host_platform_device_count=8.
"""
import json
import os
import socket
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from conftest import MULTI_DEVICE_RUN, ROOT, small_config
from lmlab.models.errors import ConfigError
from lmlab.models import sharding
from lmlab.models.registry import build
from lmlab.training import mfu
from lmlab.training.parallel import mesh_shape


def cpu_devices_env(n: int) -> dict:
  flags = os.environ.get('XLA_FLAGS', '')
  return {**os.environ, 'XLA_FLAGS': f'{flags} --xla_force_host_platform_device_count={n}',
          'JAX_PLATFORMS': 'cpu'}


def test_on_eight_devices():
  """tests/multi_device in two processes side by side, each mostly keeping one core busy: the
  steps under every mesh, and the other tests (each in one process: -n 0)."""
  steps = 'tests/multi_device/test_mesh.py::test_step_on_every_mesh_equals_one_device'
  runs = [subprocess.Popen([sys.executable, '-m', 'pytest', '-q', '-n', '0',
                            *tests], cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                           text=True, env={**cpu_devices_env(8), MULTI_DEVICE_RUN: '1'})
          for tests in ([steps], ['tests/multi_device', f'--deselect={steps}'])]
  for run in runs:
    out, err = run.communicate(timeout=900)
    summary = out[-4000:]
    assert run.returncode == 0, summary + err[-2000:]
    assert ' passed' in summary and 'skipped' not in summary, summary


@pytest.mark.parametrize('text, expected', [
    ('data:-1', dict(data=8, fsdp=1, expert=1, tensor=1)),
    ('data:2,fsdp:2,tensor:2', dict(data=2, fsdp=2, expert=1, tensor=2)),
    ('tensor:2,fsdp:-1', dict(data=1, fsdp=4, expert=1, tensor=2)),
    ('data:2,expert:4', dict(data=2, fsdp=1, expert=4, tensor=1)),
])
def test_mesh_flag(text, expected):
  assert mesh_shape(text, 8) == expected


@pytest.mark.parametrize('text, complaint', [
    ('data:3', 'has 3 devices'), ('data:-1,fsdp:-1', 'more than one'),
    ('pipeline:2', 'not <axis>:<size>'), ('data:3,fsdp:-1', 'do not divide'),
    ('data:0,fsdp:-1', 'positive'),
])
def test_bad_mesh_flag(text, complaint):
  with pytest.raises(ConfigError, match=complaint):
    mesh_shape(text, 8)


def test_logical_rules_flag():
  rules = sharding.parse_rules('embed:none, mlp:fsdp+tensor')
  assert rules['embed'] == () and rules['mlp'] == ('fsdp', 'tensor')
  assert rules['batch'] == sharding.DEFAULT_RULES['batch']
  with pytest.raises(ConfigError, match='<name>:<mesh axes>'):
    sharding.parse_rules('hidden:tensor')


def test_every_parameter_names_its_axes():
  for config in (small_config(), small_config(attention_type='mla', kv_lora_rank=16,
                                              qk_rope_head_dim=4, qk_nope_head_dim=4,
                                              v_head_dim=8, q_lora_rank=8, n_kv_heads=4)):
    abstract = nnx.eval_shape(lambda: build(config, rngs=nnx.Rngs(0)))
    for path, variable in nnx.to_flat_state(nnx.state(abstract, nnx.Param)):
      axes = sharding.logical_axes(variable)
      assert axes is not None and len(axes) == variable.get_value().ndim, path
      assert set(axes) <= set(sharding.LOGICAL_AXES) | {None}, path


@pytest.mark.parametrize('fields', [dict(), dict(n_kv_heads=1, tie_embeddings=True)])
def test_flops_per_token_match_xla_count(rng, fields):
  """XLA's FLOP count of a forward pass with attention_impl=xla, which computes every score
  (the causal mask skips none), against 2N + 4 L H D T; training's count is three forward
  passes with the causal half of the keys, (T + 1) / 2 on average."""
  config = small_config(attention_impl='xla', **fields)
  seq_len = int(rng.integers(8, 40))
  graphdef, params = nnx.split(build(config, rngs=nnx.Rngs(0)))
  tokens = jnp.zeros((2, seq_len), jnp.int32)
  forward = jax.jit(lambda p: nnx.merge(graphdef, p)(tokens)).lower(params).compile()
  counted = forward.cost_analysis()
  counted = (counted[0] if isinstance(counted, list) else counted)['flops'] / (2 * seq_len)
  attention_per_key = 4 * config.n_layers * config.n_heads * config.resolved_head_dim
  forward_formula = 2 * mfu.matmul_params(config) + attention_per_key * seq_len
  # XLA adds the norms, softmax and SiLU: a few FLOPs per feature, not per weight (an erf
  # GELU costs dozens per feature, too many to bound this way at d_model=32).
  assert forward_formula <= counted <= forward_formula * 1.1
  assert mfu.train_flops_per_token(config, seq_len) == pytest.approx(
      3 * (2 * mfu.matmul_params(config) + attention_per_key * (seq_len + 1) / 2))


def test_causal_attention_counts_visible_keys():
  config = small_config(sliding_window=4)
  assert mfu.mean_visible_keys(config, 8) == np.mean([1, 2, 3, 4, 4, 4, 4, 4])
  assert mfu.mean_visible_keys(small_config(), 8) == 4.5


def test_peak_flops_table():
  assert mfu.peak_flops('NVIDIA H100 80GB HBM3') == 989e12
  assert mfu.peak_flops('NVIDIA H100 PCIe') == 756e12
  assert mfu.peak_flops('TPU v5 lite') == 197e12
  assert mfu.peak_flops('cpu') is None


def free_port() -> int:
  with socket.socket() as s:
    s.bind(('localhost', 0))
    return s.getsockname()[1]


def test_two_processes_train_as_one(tmp_path, rng):
  """Two processes of 2 CPU devices each, joined by jax.distributed on localhost, compute
  the same losses as one process with 4 devices on the same mesh; only process 0 logs."""
  words = ['alpha', 'beta', 'gamma', 'delta', '(', ')', '\n']
  (tmp_path / 'corpus.txt').write_text(' '.join(rng.choice(words, 4000)))
  common = [sys.executable, os.path.join(ROOT, 'main.py'), f'--data={tmp_path / "corpus.txt"}',
            '--mesh=data:2,fsdp:2', '--steps=3', '--batch_size=4', '--seq_len=16',
            '--eval_batches=1', '--log_every=1', '--max_new_tokens=4', '--set', 'd_model=32',
            '--set', 'n_layers=1', '--set', 'n_heads=2', '--set', 'n_kv_heads=1',
            '--set', 'ffn_dim=64']
  port = free_port()
  runs = [subprocess.Popen([*common, f'--workdir={tmp_path / "two"}',
                            f'--coordinator_address=localhost:{port}', '--num_processes=2',
                            f'--process_id={i}'], env=cpu_devices_env(2), cwd=ROOT,
                           stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
          for i in range(2)]
  runs.append(subprocess.Popen([*common, f'--workdir={tmp_path / "one"}'],
                               env=cpu_devices_env(4), cwd=ROOT, stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, text=True))
  outputs = [run.communicate(timeout=600) for run in runs]
  for run, (out, err) in zip(runs, outputs):
    assert run.returncode == 0, err[-3000:]
  assert 'validation loss' in outputs[0][0] and 'validation loss' not in outputs[1][0]

  def losses(name):
    lines = [json.loads(line) for line in (tmp_path / name / 'metrics.jsonl').open()]
    return [(line['step'], line['loss']) for line in lines if 'loss' in line]

  two, one = losses('two'), losses('one')
  assert [step for step, _ in two] == [1, 2, 3]  # Written once, by process 0.
  np.testing.assert_allclose([loss for _, loss in two], [loss for _, loss in one], rtol=1e-5)
  assert os.path.isdir(tmp_path / 'two' / 'checkpoints' / '3')

  # Bad input seen by process 0 (another model in the same workdir) stops both processes
  # with one error line, rather than leaving process 1 waiting for it.
  port = free_port()
  runs = [subprocess.Popen([*common, '--set', 'd_model=64', f'--workdir={tmp_path / "two"}',
                            f'--coordinator_address=localhost:{port}', '--num_processes=2',
                            f'--process_id={i}'], env=cpu_devices_env(2), cwd=ROOT,
                           stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
          for i in range(2)]
  errors = [run.communicate(timeout=300)[1] for run in runs]
  assert [run.returncode for run in runs] == [1, 1]
  assert errors[0].strip().splitlines()[-1].startswith('error: ') and 'd_model' in errors[0]
  assert 'error: process 0 stopped' in errors[1] and 'd_model' in errors[1]


def test_resume_accepts_configs_of_earlier_versions(tmp_path):
  """config.json written when remat was a bool; remat and attention_impl may change."""
  from lmlab.training.workdir import WorkdirError, record_config
  config = small_config()
  record_config(str(tmp_path), {'model': config, 'data': None})
  saved = json.loads((tmp_path / 'config.json').read_text())
  saved['model']['remat'] = False
  (tmp_path / 'config.json').write_text(json.dumps(saved))
  record_config(str(tmp_path), {'model': small_config(remat='full', attention_impl='xla'),
                                'data': None})
  with pytest.raises(WorkdirError, match='d_model'):
    record_config(str(tmp_path), {'model': small_config(d_model=64), 'data': None})
