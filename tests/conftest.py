"""Shared helpers: small configs and per-run random seeds."""
import dataclasses
import json
import os
import subprocess
import sys
import unicodedata

import jax
import numpy as np
import pytest
from flax import nnx

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# The models here are tiny, so compiling takes most of the suite's time. Two settings of
# XLA's CPU compiler cut it by more than half; they change how fast the code runs (and its
# rounding in the last bits), not what it computes: LLVM's optimisation passes off, and fused
# loops emitted directly as LLVM IR instead of through the MLIR fusion emitters, which take
# several times as long on these small programs. This process and those it starts (main.py
# runs, the multi-device tests) use them. XLA reads its flags when JAX first starts its CPU
# backend, which nothing has done yet.
FAST_COMPILATION = ['--xla_backend_optimization_level=0', '--xla_cpu_use_fusion_emitters=false']


def _accepted_by_xla(flags):
  """The flags this jaxlib's XLA knows: it aborts a process on one it does not (releases
  drop flags), so each is first tried in a process of its own."""
  probes = {flag: subprocess.Popen([sys.executable, '-c', 'import jax; jax.devices()'],
                                   env={**os.environ, 'XLA_FLAGS': flag},
                                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            for flag in flags}
  return [flag for flag, probe in probes.items() if probe.wait() == 0]


_unset = [flag for flag in FAST_COMPILATION
          if flag.split('=')[0] not in os.environ.get('XLA_FLAGS', '')]
for flag in _accepted_by_xla(_unset):
  os.environ['XLA_FLAGS'] = f'{os.environ.get("XLA_FLAGS", "")} {flag}'.strip()

from lmlab.models.config import ModelConfig  # noqa: E402

# tests/multi_device needs 8 CPU devices, which JAX must be told of before it starts:
# tests/test_sharding.py runs it in a process of its own, with this variable set.
MULTI_DEVICE_RUN = 'LMLAB_MULTI_DEVICE_TESTS'
collect_ignore = [] if os.environ.get(MULTI_DEVICE_RUN) else ['multi_device']


def random_code_points(rng, n: int) -> str:
  """n code points whose Unicode category every regex engine agrees on: those assigned in
  Python's Unicode database (an assigned point keeps its category in later versions), the
  planes 4-13 that no version assigns and the private-use planes 15-16. A point that one
  engine's newer tables call a letter and another's call unassigned splits text differently
  in tiktoken (Rust) and in Python's `regex`, which is no fault of ours."""
  assigned = [p for p in rng.integers(0, 0x40000, 8 * n)
              if unicodedata.category(chr(p)) not in ('Cn', 'Cs')]
  stable = np.where(rng.random(n) < 0.2, rng.integers(0xF0000, 0x110000, n),
                    rng.integers(0x40000, 0xE0000, n))
  points = rng.permutation(assigned[:n] + list(stable))[:n]
  return ''.join(map(chr, points))


def config_rewriter(folder: str):
  """A function that rewrites the adapter_config.json of a peft folder with some fields
  changed (each call starting from the saved one)."""
  from lmlab.models.hf.peft_folders import CONFIG_FILE
  path = os.path.join(folder, CONFIG_FILE)
  with open(path) as f:
    saved = json.load(f)

  def write_config(**changes):
    with open(path, 'w') as f:
      json.dump({**saved, **changes}, f)

  return write_config


def small_config(**fields) -> ModelConfig:
  base = ModelConfig(vocab_size=61, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2,
                     ffn_dim=48, max_seq_len=64)
  return dataclasses.replace(base, **fields).validate()


def jit_call(model, **static):
  """model(*args, **kwargs, **static) as one jitted function of args and kwargs: running a
  whole model op by op is slow on a CPU."""
  graphdef, state = nnx.split(model)
  run = jax.jit(lambda state, *args, **kwargs: nnx.merge(graphdef, state)(*args, **kwargs,
                                                                          **static))
  return lambda *args, **kwargs: run(state, *args, **kwargs)


def jit_decode(model):
  """model.decode(tokens_bt, caches, index) as one jitted function of its arguments."""
  graphdef, state = nnx.split(model)
  run = jax.jit(lambda state, tokens_bt, caches, index: nnx.merge(graphdef, state).decode(
      tokens_bt, caches, index))
  return lambda tokens_bt, caches, index: run(state, tokens_bt, caches, index)


@pytest.fixture(scope='session', autouse=True)
def compilation_cache(tmp_path_factory):
  """The test processes and the processes they start (main.py runs, mostly of the same tiny
  models) share one persistent JAX compilation cache, fresh per session, instead of each
  compiling the same functions again. Under xdist its folder is beside the workers' own
  temporary folders, so that they share it too."""
  base = tmp_path_factory.getbasetemp()
  folder = (base.parent if os.environ.get('PYTEST_XDIST_WORKER') else base) / 'jax_cache'
  folder.mkdir(exist_ok=True)
  settings = {'jax_compilation_cache_dir': str(folder),
              'jax_persistent_cache_min_compile_time_secs': 0,
              'jax_persistent_cache_min_entry_size_bytes': 0}
  previous = {name: getattr(jax.config, name) for name in settings}
  with pytest.MonkeyPatch.context() as patch:
    for name, value in settings.items():
      patch.setenv(name.upper(), str(value))
      jax.config.update(name, value)
    yield
  for name, value in previous.items():
    jax.config.update(name, value)


@pytest.fixture
def corpus_dir(tmp_path, rng):
  """A folder of eight random texts of a few words, for main.py runs."""
  folder = tmp_path / 'corpus'
  folder.mkdir()
  words = ['alpha', 'beta', 'gamma', 'delta', 'λ', '数据', 'def', '(', ')', '\n']
  for i in range(8):
    text = ' '.join(rng.choice(words, 400))
    (folder / f'doc{i}.txt').write_text(text, encoding='utf-8')
  return folder


@pytest.fixture
def rng(request):
  """A numpy Generator seeded fresh per test run (the seed is printed on failure; the
  environment variable LMLAB_TEST_SEED replays one)."""
  seed = int(os.environ.get('LMLAB_TEST_SEED') or int.from_bytes(os.urandom(4), 'little'))
  print(f'random seed for {request.node.name}: {seed}')
  return np.random.default_rng(seed)
