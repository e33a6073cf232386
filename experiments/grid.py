"""The grid runner behind every experiment script.

A script names its axes (placement x norm, ...) and how a cell changes the base settings.
This module adds the common axes (--n_layers, --learning_rate and --warmup_steps take
lists), trains every (cell, seed) with training.loop.train, the loop behind main.py, in a
workdir of its own under --out, and measures it. A measured run leaves result.json in its
workdir and is skipped when the grid runs again; an interrupted one resumes from its latest
checkpoint. A workdir's name ends in a hash of the run's complete settings, so a changed
flag starts a new run rather than reusing an old one.

Settings come, in increasing priority, from --scale (quick: minutes on a 2-core CPU; full:
a GPU or TPU), the script's own defaults for that scale, and the flags given.
"""
import dataclasses
import functools
import hashlib
import itertools
import json
import math
import os
import re
import statistics
import sys
import time
from typing import Callable

import jax
import jax.numpy as jnp
from absl import flags, logging
from flax import nnx

from lmlab.data.errors import DataError
from lmlab.data import batches
from lmlab.data import corpus
from lmlab.models.errors import CheckpointError, ConfigError
from lmlab.models.config import ModelConfig, with_overrides
from lmlab.models.mlp import GATED
from lmlab.models.registry import abstract_model, build, param_count
from lmlab.training import language_modeling, loop
from lmlab.training import metrics as metrics_log
from lmlab.training import run as run_lib
from lmlab.training import steps
from lmlab.training.config import TrainConfig
from lmlab.training.optimizer import OptimizerConfig
from lmlab.training.trainer import Interrupted, TrainingError
from lmlab.training.workdir import WorkdirError, read_config

SCALES = ('quick', 'full')

flags.DEFINE_enum('scale', 'quick', SCALES, 'quick: a small model for minutes on a CPU; '
                  'full: a bigger model and longer runs for a GPU or TPU.')
flags.DEFINE_string('out', None, 'Output folder: results.csv, results.md, plots and one '
                    'workdir per run under runs/; default runs/experiments/<script>.')
flags.DEFINE_integer('seeds', None, 'Seeds per cell (0..n-1); tables show mean ± std.')
flags.DEFINE_integer('steps', None, 'Training steps per run.')
flags.DEFINE_integer('batch_size', None, 'Sequences per step.')
flags.DEFINE_integer('seq_len', None, 'Training sequence length.')
flags.DEFINE_integer('d_model', None, 'Model width.')
flags.DEFINE_integer('n_heads', None, 'Attention heads.')
flags.DEFINE_integer('head_dim', None, 'Features per head; 0: d_model / n_heads.')
flags.DEFINE_list('n_layers', None, 'Depths; several make a grid axis.')
flags.DEFINE_list('learning_rate', None, 'Peak learning rates; several make a grid axis.')
flags.DEFINE_list('warmup_steps', None, 'Linear warmup lengths; several make a grid axis.')
flags.DEFINE_integer('eval_every', None, 'Validation every N steps (for the curves).')
flags.DEFINE_integer('eval_batches', None, 'Validation batches per evaluation.')
flags.DEFINE_integer('log_every', None, 'Training loss logged every N steps.')
flags.DEFINE_integer('save_every', None, 'Checkpoint every N steps (an interrupted run '
                     'resumes from the last one).')
flags.DEFINE_float('target_loss', None, 'Training loss whose first crossing the tables report '
                   'as "steps to target".')
flags.DEFINE_string('data', None, 'A text file, directory or glob; default: the Python '
                    'standard library of this interpreter.')
flags.DEFINE_string('tokenizer', 'bytes', 'Tokenizer spec, as main.py --tokenizer.')
flags.DEFINE_multi_string('set', [], 'A ModelConfig override field=value for every run, '
                          'applied before the cell\'s own changes.')

FLAGS = flags.FLAGS

SCALE_DEFAULTS = {
    'quick': dict(seeds=2, steps=300, batch_size=16, seq_len=64, d_model=64, n_heads=4,
                  head_dim=0, n_layers=[4], learning_rate=[3e-3], warmup_steps=[30],
                  eval_every=100, eval_batches=8, log_every=5, save_every=100, target_loss=2.5),
    'full': dict(seeds=3, steps=5000, batch_size=64, seq_len=512, d_model=512, n_heads=8,
                 head_dim=0, n_layers=[12], learning_rate=[1e-3], warmup_steps=[500],
                 eval_every=500, eval_batches=32, log_every=20, save_every=500,
                 target_loss=1.5),
}
COMMON_AXES = {'n_layers': int, 'learning_rate': float, 'warmup_steps': int}
RESULT_FILE = 'result.json'


class ExperimentError(ValueError):
  """A flag or combination of flags that cannot make a grid; the message says which."""


@dataclasses.dataclass(frozen=True)
class Setup:
  """Everything one run is made of."""
  model: object        # models.config.ModelConfig
  train: object        # training.config.TrainConfig
  optimizer: object    # training.optimizer.OptimizerConfig
  # Replaces the freshly initialised parameters of a new run (train()'s init_params).
  init_params: Callable | None = None
  # What init_params does, for the workdir's hash (the function itself cannot be hashed).
  init_description: str = ''

  def with_model(self, **fields):
    return dataclasses.replace(self, model=dataclasses.replace(self.model, **fields))

  def with_train(self, **fields):
    return dataclasses.replace(self, train=dataclasses.replace(self.train, **fields))

  def with_optimizer(self, **fields):
    return dataclasses.replace(self, optimizer=dataclasses.replace(self.optimizer, **fields))


def gated_ffn_dim(d_model: int, mlp: str) -> int:
  """4 d for ReLU/GELU; 8/3 d for gated units, which have a third matrix (Shazeer 2020)."""
  return round(8 * d_model / 3) if mlp in GATED else 4 * d_model


@functools.lru_cache(maxsize=None)
def _param_count(model) -> int:
  return param_count(model)


def matched_ffn_dim(model, reference) -> int:
  """The ffn_dim that gives `model` the parameter count of `reference`. A vocabulary left to
  the tokenizer (vocab_size 0) counts the same in both, so any size stands in for it."""
  def count(config, **fields):
    return _param_count(dataclasses.replace(config, vocab_size=config.vocab_size or 256,
                                            **fields))
  low, high = count(model, ffn_dim=64), count(model, ffn_dim=128)
  return max(1, round(64 + (count(reference) - low) * 64 / (high - low)))


class Settings:
  """One script's resolved settings: --scale defaults, then the script's, then flags."""

  def __init__(self, name: str, script_defaults: dict | None = None, data: str | None = None):
    """data: what the script trains on, when not --data (for the description)."""
    self.name, self.scale, self.data = name, FLAGS.scale, data
    self._defaults = {**SCALE_DEFAULTS[self.scale], **(script_defaults or {}).get(self.scale, {})}
    self.out = FLAGS.out or os.path.join('runs', 'experiments', name)
    for flag in ('seeds', 'steps', 'batch_size', 'seq_len', 'd_model', 'n_heads'):
      if self.value(flag) < 1:
        raise ExperimentError(f'--{flag}={self.value(flag)} must be positive')
    self.common_axes = {name: self.values(name, kind) for name, kind in COMMON_AXES.items()}
    if min(self.common_axes['learning_rate']) <= 0:
      raise ExperimentError('--learning_rate values must be positive')
    if min(self.common_axes['warmup_steps']) < 0:
      raise ExperimentError('--warmup_steps values must be >= 0')
    _enable_compilation_cache(os.path.join(self.out, 'compilation_cache'))

  def value(self, name: str):
    """A flag's value: given on the command line, else the scale's default for it."""
    if FLAGS[name].present or name not in self._defaults:
      return FLAGS[name].value
    return self._defaults[name]

  def values(self, name: str, kind=str, choices=None) -> tuple:
    """A list flag's values as `kind`, checked against `choices`, duplicates dropped."""
    parsed = []
    for text in self.value(name) or ():
      try:
        value = kind(text)
      except ValueError:
        wanted = 'an integer' if kind is int else 'a number'
        raise ExperimentError(f'--{name}: {text!r} is not {wanted}') from None
      if choices is not None and value not in choices:
        raise ExperimentError(f'--{name}: {value!r} is not one of {", ".join(map(str, choices))}')
      if value not in parsed:
        parsed.append(value)
    if not parsed:
      raise ExperimentError(f'--{name} is empty; give at least one value')
    return tuple(parsed)

  @property
  def seeds(self) -> int:
    return self.value('seeds')

  def cells(self, axes: dict) -> list[dict]:
    """Every combination of the script's axes and the common ones (script axes vary slowest)."""
    every_axis = {**axes, **self.common_axes}
    return [dict(zip(every_axis, values)) for values in itertools.product(*every_axis.values())]

  def shown_axes(self, axes: dict) -> list[str]:
    """The table's axes: the script's, and the common ones that take several values."""
    return list(axes) + [name for name, values in self.common_axes.items() if len(values) > 1]

  def base_setup(self, cell: dict, seed: int) -> Setup:
    """The run every cell starts from: a pre-norm SwiGLU RoPE decoder of the flags' size."""
    d_model, n_heads, seq_len = self.value('d_model'), self.value('n_heads'), self.value('seq_len')
    model = with_overrides(
        ModelConfig(d_model=d_model, n_layers=cell['n_layers'], n_heads=n_heads,
                    n_kv_heads=n_heads, head_dim=self.value('head_dim'),
                    ffn_dim=gated_ffn_dim(d_model, 'swiglu'), mlp='swiglu',
                    max_seq_len=seq_len), FLAGS.set)
    train = TrainConfig(
        workdir='', steps=self.value('steps'), batch_size=self.value('batch_size'),
        seq_len=seq_len, seed=seed, data=FLAGS.data, tokenizer=FLAGS.tokenizer,
        eval_every=self.value('eval_every'), eval_batches=self.value('eval_batches'),
        save_every=self.value('save_every'), keep_checkpoints=1,
        log_every=self.value('log_every'))
    optimizer = OptimizerConfig(learning_rate=cell['learning_rate'],
                                warmup_steps=cell['warmup_steps'], total_steps=train.steps)
    return Setup(model, train, optimizer)

  def command(self) -> str:
    """The command that reruns this grid: the script and the flags given."""
    given = ' '.join(FLAGS[name].serialize() for name in FLAGS if FLAGS[name].present)
    return f'python experiments/{self.name}.py {given}'.strip()

  def describe(self) -> str:
    """One line of the settings every run shares, for results.md."""
    data = self.data or FLAGS.data or 'the Python standard library'
    head_dim = self.value('head_dim') or self.value('d_model') // self.value('n_heads')
    common = ', '.join(f'{name} {"/".join(map(str, values))}'
                       for name, values in self.common_axes.items())
    return (f'--scale={self.scale}: d_model {self.value("d_model")}, {self.value("n_heads")} '
            f'heads of {head_dim}, {common}; {self.value("steps")} steps of '
            f'{self.value("batch_size")} x {self.value("seq_len")} tokens; {self.seeds} '
            f'seed{"s" if self.seeds > 1 else ""}; '
            f'data: {data}, tokenizer {FLAGS.tokenizer}'
            + (f'; --set {" ".join(FLAGS.set)}' if FLAGS.set else ''))


def _enable_compilation_cache(path: str):
  """Runs that differ only in seed compile to the same program; keep it on disk once."""
  if jax.config.jax_compilation_cache_dir is None:
    jax.config.update('jax_compilation_cache_dir', os.path.abspath(path))
    jax.config.update('jax_persistent_cache_min_compile_time_secs', 0.5)


def _run_hash(cell: dict, setup: Setup) -> str:
  described = {'cell': cell, 'model': dataclasses.asdict(setup.model),
               'train': {**dataclasses.asdict(setup.train), 'workdir': None},
               'optimizer': dataclasses.asdict(setup.optimizer), 'init': setup.init_description}
  return hashlib.sha1(json.dumps(described, sort_keys=True, default=str).encode()).hexdigest()[:8]


def workdir_of(out: str, cell: dict, setup: Setup) -> str:
  """Where grid.run trains (cell, setup) under --out."""
  name = '-'.join(re.sub(r'[^A-Za-z0-9.+_=]', '_', str(v)) for v in cell.values())
  return os.path.join(out, 'runs', f'{name}-seed{setup.train.seed}-{_run_hash(cell, setup)}')


def _share_token_cache(out: str, workdir: str):
  """Points the workdir's token cache and tokenizer folder at one copy for the whole grid."""
  os.makedirs(workdir, exist_ok=True)
  for folder in ('tokens', 'tokenizer'):
    shared, link = os.path.join(out, folder), os.path.join(workdir, folder)
    os.makedirs(shared, exist_ok=True)
    if not os.path.lexists(link):
      os.symlink(os.path.relpath(shared, workdir), link)


def _duration(seconds: float) -> str:
  seconds = int(seconds)
  return f'{seconds // 60}m{seconds % 60:02d}s' if seconds >= 60 else f'{seconds}s'


def graphdef_of(model):
  """The graph definition of a model config, for parameters of the same shapes."""
  return nnx.graphdef(abstract_model(model))


@dataclasses.dataclass
class Trained:
  """A run after training, for a script's measurements."""
  setup: Setup
  model: object             # the resolved ModelConfig (vocab_size filled in)
  params: object | None     # the final parameters; None when training diverged

  @functools.cached_property
  def graphdef(self):
    return graphdef_of(self.model)

  def initial_params(self):
    """The parameters the run started from (the loop's initialisation, then init_params)."""
    params = nnx.split(build(self.model, rngs=nnx.Rngs(params=self.setup.train.seed)))[1]
    return self.setup.init_params(params) if self.setup.init_params else params

  @functools.cached_property
  def _data(self):
    splits = corpus.split_corpus(self.setup.train.data, self.setup.train.val_fraction)
    tokenizer = language_modeling.load_run_tokenizer(self.setup.train, splits)
    tokens = language_modeling.tokenize(self.setup.train, tokenizer, splits,
                                        log=lambda *_: None)
    return tokens, language_modeling.end_token(self.setup.train, tokenizer)

  @property
  def val_tokens(self):
    return self._data[0]['val']

  @property
  def train_tokens(self):
    return self._data[0]['train']

  @property
  def end_token(self):
    return self._data[1]

  def val_batch(self, batch_size: int | None = None, seq_len: int | None = None) -> dict:
    """The first validation batch, as the loop's evaluation sees it."""
    batch = next(batches.eval_batches(
        self.val_tokens, batch_size=batch_size or self.setup.train.batch_size,
        seq_len=seq_len or self.setup.train.seq_len, max_batches=1, end_token=self.end_token))
    return {k: jnp.asarray(v) for k, v in batch.items()}

  def eval_loss(self, params, seq_len: int, *, graphdef=None) -> float:
    """Validation loss on windows of seq_len, over as many tokens as the loop evaluates on."""
    train = self.setup.train
    tokens_per_batch = train.micro_batch_size * train.seq_len
    batches.check_length(self.val_tokens, seq_len, 'validation')
    return language_modeling.evaluate_tokens(
        steps.make_eval_step(graphdef or self.graphdef), params, self.val_tokens,
        batch_size=max(1, tokens_per_batch // seq_len), seq_len=seq_len,
        max_batches=train.eval_batches, end_token=self.end_token)


def final_params(workdir: str):
  """The parameters of a workdir's latest checkpoint."""
  return run_lib.restore(workdir).params


def _is_number(value) -> bool:
  return type(value) in (int, float)


def _is_metrics_line(entry) -> bool:
  """Whether `entry` has what training_record reads: an integer step, and with a training
  loss a positive throughput, with an evaluation a number."""
  return (isinstance(entry, dict) and type(entry.get('step')) is int
          and ('loss' not in entry or (_is_number(entry['loss'])
                                       and _is_number(entry.get('tokens_per_sec'))
                                       and entry['tokens_per_sec'] > 0))
          and ('eval_loss' not in entry or _is_number(entry['eval_loss'])))


def _metrics_lines(workdir: str) -> list[dict]:
  """The metrics lines of metrics.jsonl (others are skipped with a warning)."""
  return metrics_log.read(workdir, _is_metrics_line)


def _steps_to_target(steps, losses, target: float, window: int = 3):
  """The first logged step where the mean of the last `window` training losses <= target."""
  for i, step in enumerate(steps):
    recent = losses[max(0, i - window + 1):i + 1]
    if len(recent) == window and sum(recent) / window <= target:
      return step
  return None


def run_sizes(workdir: str) -> dict:
  """The first metrics line's sizes: parameters, trainable ones, optimizer state and the
  compiled step's memory (training/loop.py)."""
  return next((m for m in _metrics_lines(workdir) if 'trainable_params' in m), {})


def training_record(workdir: str, setup: Setup, target_loss: float, error: str | None) -> dict:
  """What metrics.jsonl says about a run: losses, divergence, speed and curves.

  A resumed run appends to metrics.jsonl, so a step logged twice keeps its last line.
  Diverged: the loop stopped at a non-finite loss, or the final validation loss is not
  below the one at initialisation. step_ms is the median over logged intervals after the
  first (which holds compilation).
  """
  lines = _metrics_lines(workdir)
  train = {m['step']: m for m in lines if 'loss' in m}
  evals = {m['step']: m['eval_loss'] for m in lines if 'eval_loss' in m}
  train_steps = sorted(train)
  losses = [train[s]['loss'] for s in train_steps]
  initial = evals.get(0, math.nan)
  final = math.nan if error else evals.get(setup.train.steps, math.nan)
  tokens_per_step = setup.train.batch_size * setup.train.seq_len
  step_ms = [1e3 * tokens_per_step / train[s]['tokens_per_sec'] for s in train_steps[1:]]
  return {
      'final_eval_loss': final,
      'initial_eval_loss': initial,
      'diverged': bool(error) or not final < initial,
      'steps_to_target': _steps_to_target(train_steps, losses, target_loss),
      'step_ms': statistics.median(step_ms) if step_ms else math.nan,
      'params': param_count(read_config(workdir)['model']),
      'error': error,
      'train_steps': train_steps,
      'train_losses': losses,
      'eval_steps': sorted(evals),
      'eval_losses': [evals[s] for s in sorted(evals)],
  }


def _read_result(workdir: str):
  path = os.path.join(workdir, RESULT_FILE)
  if not os.path.exists(path):
    return None
  with open(path) as f:
    return json.load(f)


def _write_result(workdir: str, record: dict):
  path = os.path.join(workdir, RESULT_FILE)
  with open(path + '.partial', 'w') as f:
    json.dump(record, f, indent=1)
  os.replace(path + '.partial', path)


def run(settings: Settings, cells: list[dict], configure: Callable[[dict, Setup], Setup],
        measure: Callable[[Trained], dict] | None = None) -> list[dict]:
  """Trains and measures every (cell, seed) not finished before; one record per run.

  configure(cell, base setup) -> the cell's setup; measure(trained) -> extra record fields.
  Every setup is built (and its model config checked) before anything trains.
  """
  planned = []
  for cell in cells:
    for seed in range(settings.seeds):
      setup = configure(cell, settings.base_setup(cell, seed))
      setup.model.validate()
      planned.append((cell, setup, workdir_of(settings.out, cell, setup)))
  varying = [k for k in cells[0] if len({str(c[k]) for c in cells}) > 1] or list(cells[0])
  records, durations = [], []
  for index, (cell, setup, workdir) in enumerate(planned, 1):
    label = ' '.join(f'{k}={cell[k]}' for k in varying) + f' seed={setup.train.seed}'
    header = f'[{settings.name} {index}/{len(planned)}] {label}'
    record = _read_result(workdir)
    if record is not None:
      print(f'{header}: finished before ({workdir})', flush=True)
      records.append(record)
      continue
    remaining = sum(_read_result(w) is None for _, _, w in planned[index - 1:])
    eta = (f' | grid ETA {_duration(statistics.mean(durations) * remaining)}'
           if durations else '')
    print(f'{header}{eta}', flush=True)
    started = time.perf_counter()
    _share_token_cache(settings.out, workdir)
    train_config = dataclasses.replace(setup.train, workdir=workdir)
    setup = dataclasses.replace(setup, train=train_config)
    error, params = None, None
    try:
      params = loop.train(train_config, setup.model, setup.optimizer,
                          init_params=setup.init_params)[0]
    except TrainingError as e:
      error = str(e)
      print(f'  diverged: {error}', flush=True)
    record = {**cell, 'seed': setup.train.seed, 'workdir': os.path.relpath(workdir, settings.out),
              **training_record(workdir, setup, settings.value('target_loss'), error)}
    if measure is not None:
      record.update(measure(Trained(setup, read_config(workdir)['model'], params)))
    _write_result(workdir, record)
    records.append(record)
    durations.append(time.perf_counter() - started)
    print(f'  validation loss {record["final_eval_loss"]:.4f} '
          f'(from {record["initial_eval_loss"]:.4f}) in {_duration(durations[-1])}', flush=True)
  return records


def entry_point(run_experiment: Callable[[], None]):
  """main(argv) for absl's app.run: bad input is one 'error:' line and exit status 1."""

  def main(argv):
    if len(argv) > 1:
      print(f'error: unexpected arguments: {" ".join(argv[1:])}', file=sys.stderr)
      sys.exit(1)
    logging.set_verbosity(logging.WARNING)  # Orbax logs every save at INFO.
    try:
      run_experiment()
    except (ExperimentError, ConfigError, DataError, CheckpointError, WorkdirError) as e:
      print(f'error: {e}', file=sys.stderr)
      sys.exit(1)
    except Interrupted as e:
      print(f'{e}; the grid goes on from there', file=sys.stderr)
      sys.exit(e.exit_code)

  return main
