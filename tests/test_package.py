"""lmlab as a package: it lives beside packages that use our folders' names, and its wheel
alone trains a model with the `lmlab` command."""
import concurrent.futures
import os
import shutil
import subprocess
import sys
import zipfile

import pytest

from conftest import ROOT

# Each top-level folder of ours is a module name some other package may own (transformers
# imports Hugging Face's `kernels`).
OUR_FOLDERS = sorted(name for name in os.listdir(ROOT)
                     if os.path.isdir(os.path.join(ROOT, name)) and not name.startswith('.')
                     and any(f.endswith('.py') for f in os.listdir(os.path.join(ROOT, name))))


def test_transformers_imports_after_our_kernels():
  from lmlab.kernels import attention  # noqa: F401
  from lmlab.models import config  # noqa: F401
  import transformers
  import transformers.activations  # noqa: F401
  assert transformers.LlamaConfig().model_type == 'llama'


def run_python(code, cwd, **env):
  result = subprocess.run([sys.executable, '-c', code], cwd=cwd, env={**os.environ, **env},
                          capture_output=True, text=True, timeout=300)
  assert result.returncode == 0, result.stderr[-3000:]


@pytest.mark.parametrize('where', ['root', 'elsewhere'])
def test_other_packages_keep_our_folder_names(tmp_path, where):
  """transformers works in a process that imported our kernels first; and a package named
  like each of our folders, later on sys.path than the repository root (python -m pytest
  and python -c from the root put the root first), is the one imported."""
  cwd = ROOT if where == 'root' else tmp_path
  site = tmp_path / 'site'
  for name in OUR_FOLDERS:
    (site / name).mkdir(parents=True)
    (site / name / '__init__.py').write_text(f'OWNER = "another {name}"\n')
  ours = 'import lmlab.kernels.attention, lmlab.models.config, lmlab.training.loop\n'
  transformers_works = ('import transformers, transformers.activations\n'
                        'assert transformers.LlamaConfig().model_type == "llama"\n')
  others_win = (f'for name in {OUR_FOLDERS!r}:\n'
                '  module = __import__(name)\n'
                '  assert getattr(module, "OWNER", None) == "another " + name, (name, module)\n')
  # Side by side: each process mostly keeps one core busy importing.
  with concurrent.futures.ThreadPoolExecutor(2) as pool:
    runs = [pool.submit(run_python, ours + transformers_works, cwd),
            pool.submit(run_python, ours + others_win, cwd, PYTHONPATH=str(site))]
    for run in runs:
      run.result()


def test_wheel_trains_and_samples_from_anywhere(tmp_path, rng):
  """The wheel `pip install .` would install holds every module a run needs, and its
  `lmlab` entry point trains and samples in a folder outside the repository."""
  pytest.importorskip('setuptools')
  source = tmp_path / 'source'  # setuptools builds in the tree it is given.
  shutil.copytree(ROOT, source, ignore=shutil.ignore_patterns(
      '.git', 'build', '*.egg-info', 'runs', '__pycache__', 'fixtures', 'results'))
  subprocess.run([sys.executable, '-m', 'pip', 'wheel', '--no-deps', '--no-build-isolation',
                  '-q', '-w', str(tmp_path / 'dist'), str(source)], check=True,
                 capture_output=True, timeout=300)
  [wheel] = (tmp_path / 'dist').iterdir()
  with zipfile.ZipFile(wheel) as archive:
    archive.extractall(tmp_path / 'site')
    entry_points = next(archive.read(name).decode() for name in archive.namelist()
                        if name.endswith('.dist-info/entry_points.txt'))
  assert 'lmlab = lmlab.main:run' in entry_points
  assert not (tmp_path / 'site' / 'tests').exists()
  corpus = tmp_path / 'corpus.txt'
  corpus.write_text(' '.join(rng.choice(['alpha', 'beta', 'gamma', '\n'], 2000)))
  launcher = 'import sys, lmlab.main; sys.argv[0] = "lmlab"; lmlab.main.run()'
  env = {**os.environ, 'PYTHONPATH': str(tmp_path / 'site')}
  common = ['--workdir=run', f'--data={corpus}', '--set', 'd_model=32', '--set', 'n_layers=1',
            '--set', 'n_heads=2', '--set', 'n_kv_heads=1', '--set', 'ffn_dim=64',
            '--max_new_tokens=4']
  outputs = []
  for args in (['--steps=2', '--warmup_steps=1', '--batch_size=2', '--seq_len=16',
                '--eval_batches=1'], ['--mode=generate', '--prompt=alpha ']):
    result = subprocess.run([sys.executable, '-c', launcher, *common, *args], cwd=tmp_path,
                            env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    outputs.append(result.stdout)
  assert 'sample:' in outputs[0] and outputs[1].startswith('alpha ')
  probe = subprocess.run([sys.executable, '-c', 'import lmlab; print(lmlab.__file__)'],
                         cwd=tmp_path, env=env, capture_output=True, text=True, check=True)
  assert probe.stdout.startswith(str(tmp_path / 'site')), probe.stdout
