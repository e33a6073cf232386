"""The training loop behind `main.py --mode=train`, and evaluation of a parameter state.

The batch for step s is a pure function of (seed, s) and dropout keys derive from
(seed, s), so a run resumed from its checkpoint computes bitwise the same losses as an
uninterrupted one.

What is trained on is an objective's business (see LanguageModeling, the default):
BERT's, sequence-to-sequence and classification objectives live in training/objectives.py
and plug into the same loop.
"""
import contextlib
import dataclasses
import math
import os
import signal
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.experimental import multihost_utils

from lmlab.data.errors import DataError
from lmlab.data import batches as batches_lib
from lmlab.data import corpus as corpus_lib
from lmlab.data import token_cache
from lmlab.data import tokenizer as tokenizer_lib
from lmlab.models import sharding
from lmlab.models.config import ConfigError, ModelConfig
from lmlab.models.registry import build
from lmlab.training import mfu as mfu_lib
from lmlab.training import parallel
from lmlab.training import steps as steps_lib
from lmlab.training import workdir as workdir_lib
from lmlab.training.checkpoint import Checkpoints
from lmlab.training.metrics import MetricsLog, Progress
from lmlab.training.optimizer import OptimizerConfig, make_optimizer, schedule


class TrainingError(RuntimeError):
  """Training cannot go on (for example a non-finite loss)."""


class Interrupted(Exception):
  """SIGINT or SIGTERM arrived; the state was saved first."""

  def __init__(self, message: str, signum: int):
    super().__init__(message)
    self.exit_code = 128 + signum


OBJECTIVES = ('lm', 'bert', 'roberta', 'classify', 'seq2seq')


@dataclasses.dataclass(frozen=True)
class TrainConfig:
  workdir: str
  steps: int = 600
  batch_size: int = 16
  seq_len: int = 256
  grad_accum: int = 1
  seed: int = 0
  data: str | None = None      # None: the Python standard library of this interpreter.
  val_fraction: float = 0.05
  tokenizer: str = 'bytes'         # A data.tokenizer spec.
  tokenizer_pattern: str | None = None  # Pre-tokenisation of a .tiktoken file without .json.
  tokenizer_sha256: str | None = None   # Checked against a .tiktoken file when given.
  document_masking: bool = True  # Packed documents do not attend across their boundaries.
  z_loss: float = 0.0          # Weight of PaLM's log^2 Z penalty (1e-4 in the paper); 0: off.
  max_z_loss: float = 0.0      # Weight of Baichuan 2's max-logit^2 penalty (2e-4); 0: off.
  # What is learned (training/objectives.py): lm (next token), bert (masked LM + next
  # sentence), roberta (masked LM of full-length spans, dynamic masking), classify
  # (label<TAB>text lines), seq2seq (source<TAB>target pairs or synthetic:<task>).
  objective: str = 'lm'
  label_smoothing: float = 0.0  # seq2seq: the target distribution's mass spread uniformly.
  beam_size: int = 1            # seq2seq eval: > 1 also decodes with beam search.
  length_penalty: float = 0.6   # seq2seq beam search: Wu et al. 2016's alpha.
  eval_every: int = 200
  eval_batches: int = 16
  save_every: int = 200
  keep_checkpoints: int = 3
  log_every: int = 10
  mesh: str = 'data:-1'         # Device mesh axes (training/parallel.py): data:2,fsdp:2,tensor:2.
  logical_rules: str = ''       # Changes to models/sharding.py's rules: embed:none,batch:data.
  peak_flops: float = 0.0       # One device's peak FLOP/s for MFU; 0: training/mfu.py's table.

  @property
  def micro_batch_size(self) -> int:
    """Sequences per micro-batch: the batch split over grad_accum (also the eval batch)."""
    return self.batch_size // self.grad_accum

  def validate(self):
    for name in ('steps', 'batch_size', 'seq_len', 'grad_accum', 'eval_every', 'eval_batches',
                 'save_every', 'keep_checkpoints', 'log_every'):
      if getattr(self, name) <= 0:
        raise ConfigError(f'--{name}={getattr(self, name)} must be positive')
    if self.batch_size % self.grad_accum:
      raise ConfigError(f'--batch_size={self.batch_size} is not divisible by '
                        f'--grad_accum={self.grad_accum}')
    if self.objective not in OBJECTIVES:
      raise ConfigError(f'--objective={self.objective!r} is not one of {", ".join(OBJECTIVES)}')
    if self.beam_size < 1:
      raise ConfigError(f'--beam_size={self.beam_size} must be at least 1')
    for name in ('z_loss', 'max_z_loss', 'label_smoothing'):
      if not 0.0 <= getattr(self, name) < 1.0:
        raise ConfigError(f'--{name}={getattr(self, name)} must be in [0, 1) (0: off)')
    if self.peak_flops < 0:
      raise ConfigError(f'--peak_flops={self.peak_flops} must be >= 0 (0: the known devices)')
    if not 0.0 < self.val_fraction < 1.0:
      raise ConfigError(f'--val_fraction={self.val_fraction} must be between 0 and 1')
    return self


def tokenizer_dir(workdir: str) -> str:
  return os.path.join(workdir, 'tokenizer')


def load_run_tokenizer(train_config: TrainConfig, splits=None):
  """The run's tokenizer; a trainable spec is trained on the training split once."""
  return tokenizer_lib.load_tokenizer(
      train_config.tokenizer, cache_dir=tokenizer_dir(train_config.workdir),
      train_texts=None if splits is None else lambda: corpus_lib.texts_of(splits['train']),
      pattern=train_config.tokenizer_pattern, expected_sha256=train_config.tokenizer_sha256)


def tokenize(train_config: TrainConfig, tokenizer, splits, *, log=print):
  """{split name: token memmap}, from the workdir's cache when it holds them."""
  identity = tokenizer_lib.fingerprint(train_config.tokenizer,
                                       tokenizer_dir(train_config.workdir))
  return token_cache.load_splits(splits, tokenizer, os.path.join(train_config.workdir, 'tokens'),
                                 tokenizer_id=identity, log=log)


def resolve_vocab(model_config: ModelConfig, tokenizer) -> ModelConfig:
  """vocab_size=0 means the tokenizer's, rounded up to a multiple of 64."""
  if model_config.vocab_size:
    return model_config
  return dataclasses.replace(model_config, vocab_size=-(-tokenizer.n_vocab // 64) * 64)


def check_fits(model_config: ModelConfig, tokenizer, seq_len: int):
  if model_config.vocab_size < tokenizer.n_vocab:
    raise ConfigError(f'vocab_size={model_config.vocab_size} is smaller than the tokenizer\'s '
                      f'{tokenizer.n_vocab} tokens; --set vocab_size={tokenizer.n_vocab} or more')
  if model_config.position == 'learned' and seq_len > model_config.max_seq_len:
    raise ConfigError(f'--seq_len={seq_len} is longer than the learned position table '
                      f'(max_seq_len={model_config.max_seq_len}); lower --seq_len or '
                      f'--set max_seq_len={seq_len}')


def end_token(train_config: TrainConfig, tokenizer):
  """The id that separates documents when they are masked from each other, else None."""
  return tokenizer_lib.separator_id(tokenizer) if train_config.document_masking else None


def evaluate(eval_step, params, tokens, *, batch_size: int, seq_len: int, max_batches: int,
             end_token, put_batch=None):
  """Mean cross-entropy over evenly spaced windows of `tokens`; put_batch places a numpy
  batch on the devices (default: jnp.asarray)."""
  put_batch = put_batch or (lambda batch: jax.tree.map(jnp.asarray, batch))
  losses = [eval_step(params, put_batch(batch))
            for batch in batches_lib.eval_batches(tokens, batch_size=batch_size, seq_len=seq_len,
                                                  max_batches=max_batches, end_token=end_token)]
  return float(np.mean(jax.device_get(losses)))


class LanguageModeling:
  """Next-token prediction on a tokenised corpus: the default objective of `train`.

  An objective prepares a run's data and says how to batch, score and evaluate it:
    model_config, tokenizer   the model config resolved against the data (vocab_size 0, ...)
    load_data()               called once the run's config is recorded (tokenising, checks)
    train_batch(step)         numpy arrays [batch_size, ...], a pure function of (seed, step)
    loss                      loss(model, batch, dropout_key) -> (loss, metrics with 'loss'),
                              or None for steps.make_train_step's next-token loss
    evaluate(graphdef, params) -> {'eval_loss': ..., and other eval metrics}
    put_batch(numpy batch)    places a batch on the devices; `train` sets it to the
                              run's (training.parallel.Layout.put_batch)
  """
  loss = None
  put_batch = None

  def __init__(self, train_config: TrainConfig, model_config: ModelConfig, *, log=print):
    self.config, self.log = train_config, log
    self.splits = corpus_lib.split_corpus(train_config.data, train_config.val_fraction)
    self.tokenizer = load_run_tokenizer(train_config, self.splits)
    self.model_config = resolve_vocab(model_config, self.tokenizer).validate()
    check_fits(self.model_config, self.tokenizer, train_config.seq_len)
    self.separator = end_token(train_config, self.tokenizer)
    self._eval_steps = {}

  def load_data(self):
    self.data = tokenize(self.config, self.tokenizer, self.splits, log=self.log)
    batches_lib.check_length(self.data['train'], self.config.seq_len, 'train')
    batches_lib.check_length(self.data['val'], self.config.seq_len, 'validation')

  def train_batch(self, step: int):
    return batches_lib.train_batch(self.data['train'], seed=self.config.seed, step=step,
                                   batch_size=self.config.batch_size,
                                   seq_len=self.config.seq_len, end_token=self.separator)

  def evaluate(self, graphdef, params):
    if graphdef not in self._eval_steps:
      self._eval_steps[graphdef] = steps_lib.make_eval_step(graphdef)
    loss = evaluate(self._eval_steps[graphdef], params, self.data['val'],
                    batch_size=self.config.micro_batch_size, seq_len=self.config.seq_len,
                    max_batches=self.config.eval_batches, end_token=self.separator,
                    put_batch=self.put_batch)
    return {'eval_loss': loss, 'eval_ppl': math.exp(min(loss, 700))}


@contextlib.contextmanager
def _stop_requests():
  """Turns SIGINT/SIGTERM into a flag the loop checks after each step."""
  received = []
  handler = lambda signum, frame: received.append(signum)
  previous = {s: signal.signal(s, handler) for s in (signal.SIGINT, signal.SIGTERM)}
  try:
    yield received
  finally:
    for s, h in previous.items():
      signal.signal(s, h)


def _process_zero_first(fn):
  """fn() on process 0, then on the others, which find the files it wrote (tokenizer,
  token cache) instead of writing them at the same time. An error of process 0 (bad
  input) stops every process with the same message, rather than leaving them waiting."""
  if jax.process_count() == 1:
    return fn()
  message = ''
  if jax.process_index() == 0:
    try:
      result = fn()
    except (ConfigError, DataError, workdir_lib.WorkdirError) as e:
      failure, message = e, str(e)
  message_bytes = message.encode()[:4096]
  encoded = np.zeros(4096, np.uint8)
  encoded[:len(message_bytes)] = np.frombuffer(message_bytes, np.uint8)
  shared = bytes(multihost_utils.broadcast_one_to_all(encoded)).rstrip(b'\0').decode(
      errors='replace')
  if jax.process_index() == 0:
    if message:
      raise failure
    return result
  if shared:
    raise ConfigError(f'process 0 stopped: {shared}')
  return fn()


def _agree(flag: bool) -> bool:
  """True on every process when it is true on any (a stop request)."""
  if jax.process_count() == 1:
    return flag
  return bool(np.any(multihost_utils.process_allgather(np.int32(flag))))


def _compiled_memory(compiled) -> dict:
  """The compiled step's memory (bytes per device), where the backend reports it."""
  try:
    analysis = compiled.memory_analysis()
  except (NotImplementedError, jax.errors.JaxRuntimeError):
    analysis = None
  if analysis is None:
    return {}
  # Donated inputs are aliased to outputs: peak, where reported, counts them once.
  fields = {f'step_{name}_bytes': f'{name}_size_in_bytes'
            for name in ('argument', 'output', 'alias', 'temp', 'generated_code')}
  fields['step_peak_bytes'] = 'peak_memory_in_bytes'
  return {key: int(getattr(analysis, attribute)) for key, attribute in fields.items()
          if getattr(analysis, attribute, None) is not None}


def train(train_config: TrainConfig, model_config: ModelConfig, opt_config: OptimizerConfig,
          *, print_fn=print, init_params=None, objective=LanguageModeling):
  """Trains (or resumes) in train_config.workdir; returns (params, graphdef, tokenizer, summary).

  objective(train_config, model_config, log=print_fn) makes the objective (see
  LanguageModeling); the summary holds its final eval metrics.

  init_params(params) -> params, when given, replaces the freshly initialised parameters of a
  new run (another initialisation, or weights to fine-tune); a resumed run ignores it.

  The state lives on the mesh of train_config.mesh (training/parallel.py); with several
  processes, only process 0 writes the config, metrics and progress, and every process
  takes part in each checkpoint.
  """
  train_config.validate()
  model_config.validate()
  workdir = train_config.workdir
  layout = parallel.Layout.create(train_config.mesh, train_config.logical_rules, model_config)
  if train_config.micro_batch_size % layout.batch_ways():
    raise ConfigError(f'a micro-batch of {train_config.micro_batch_size} sequences does not '
                      f'split over the {layout.batch_ways()} devices of the batch axes of '
                      f'--mesh={train_config.mesh}; make --batch_size / --grad_accum a '
                      'multiple of them')
  lead = jax.process_index() == 0
  if not lead:
    print_fn = lambda *args, **kwargs: None

  def prepare():
    task = objective(train_config, model_config, log=print_fn)
    resolved = {'model': task.model_config, **dataclasses.asdict(train_config),
                'optimizer': dataclasses.asdict(opt_config)}
    if lead:
      workdir_lib.record_config(workdir, resolved)
    task.load_data()
    return task

  task = _process_zero_first(prepare)
  model_config = task.model_config
  task.put_batch = layout.put_batch

  with sharding.activation_rules(layout.rules):
    return _train(train_config, model_config, opt_config, task, layout, print_fn=print_fn,
                  init_params=init_params, lead=lead)


def _train(train_config, model_config, opt_config, task, layout, *, print_fn, init_params,
           lead):
  workdir = train_config.workdir

  def new_params():
    return nnx.split(build(model_config, rngs=nnx.Rngs(params=train_config.seed)))[1]

  graphdef, _ = nnx.split(nnx.eval_shape(lambda: build(model_config, rngs=nnx.Rngs(0))))
  abstract_params = jax.eval_shape(new_params)
  params_at = layout.state_shardings(abstract_params)
  optimizer = make_optimizer(opt_config)
  opt_state_at = layout.state_shardings(jax.eval_shape(optimizer.init, abstract_params))
  checkpoints = Checkpoints(workdir, keep=train_config.keep_checkpoints)
  record = {'seed': train_config.seed, 'tokenizer': train_config.tokenizer,
            'config': workdir_lib.config_path(workdir)}

  latest = checkpoints.latest_step()
  start_step = latest or 0
  if latest is None:
    params = jax.jit(new_params, out_shardings=params_at)()
    if init_params is not None:
      params = jax.device_put(init_params(params), params_at)
    opt_state = None
  else:
    params, opt_state, _ = checkpoints.restore(latest, abstract_params, optimizer.init,
                                               place=layout.abstract)
    print_fn(f'resumed from checkpoint {latest} in {checkpoints.directory}')
  if opt_state is None:
    opt_state = jax.jit(optimizer.init, out_shardings=opt_state_at)(params)
  param_bytes = parallel.bytes_per_device(params)
  print_fn(f'mesh {dict(layout.mesh.shape)} on {jax.device_count()} devices '
           f'({jax.process_count()} processes); parameters: {param_bytes / 2**20:.1f} MiB '
           'on the fullest device')

  accum = train_config.grad_accum

  def step_batch(step):
    micro_batches = {k: np.asarray(v).reshape(accum, -1, *np.shape(v)[1:])
                     for k, v in task.train_batch(step).items()}
    return layout.put_batch(micro_batches, batch_axis=1)

  first_batch = step_batch(start_step)
  train_step = steps_lib.make_train_step(
      graphdef, optimizer, schedule(opt_config), seed=train_config.seed,
      use_dropout=model_config.dropout_rate > 0, z_loss=train_config.z_loss,
      max_z_loss=train_config.max_z_loss, loss_fn=task.loss,
      shardings=(params_at, opt_state_at, {k: v.sharding for k, v in first_batch.items()},
                 layout.replicated))
  train_step = train_step.lower(params, opt_state, first_batch,
                                layout.put_replicated(np.int32(start_step))).compile()
  metrics_log = MetricsLog(workdir) if lead else None
  flops_per_token = (mfu_lib.train_flops_per_token(model_config, train_config.seq_len)
                     if model_config.family == 'decoder' else None)
  peak = train_config.peak_flops or mfu_lib.peak_flops(jax.devices()[0].device_kind)
  memory = _compiled_memory(train_step)
  if 'step_temp_bytes' in memory:
    print_fn(f'compiled step: {memory["step_temp_bytes"] / 2**20:.1f} MiB of temporaries per '
             'device')
  if lead:
    metrics_log.write(step=start_step, param_bytes_per_device=param_bytes,
                      devices=jax.device_count(), **memory)

  def run_eval(step):
    metrics = task.evaluate(graphdef, params)
    if lead:
      metrics_log.write(step=step, **metrics)
    return metrics

  def save(step, metrics):
    if metrics is not None and not all(map(math.isfinite, metrics.values())):
      raise TrainingError(
          f'non-finite training metrics at step {step} ({metrics}); the last good checkpoint '
          f'({checkpoints.latest_step()}) is kept. Lower --learning_rate or raise --warmup_steps')
    checkpoints.save(step, {'params': params, 'opt_state': opt_state},
                     {**record, 'step': step, 'data_cursor': step})

  progress = Progress(train_config.steps) if lead else None
  initial_loss = run_eval(start_step)['eval_loss'] if start_step == 0 else None
  if initial_loss is not None and lead:
    progress.message(f'step 0: validation loss {initial_loss:.4f}')
  tokens_per_step = train_config.batch_size * train_config.seq_len
  last_metrics, interval_start, interval_steps = None, time.perf_counter(), 0
  try:
    with _stop_requests() as stop:
      for step in range(start_step, train_config.steps):
        batch = first_batch if step == start_step else step_batch(step)
        params, opt_state, metrics = train_step(params, opt_state, batch,
                                                layout.put_replicated(np.int32(step)))
        done, interval_steps = step + 1, interval_steps + 1
        is_last = done == train_config.steps
        # A signal arriving later is handled after the next step; with several processes,
        # at a log step, where they all stop together.
        stopping = (bool(stop) if jax.process_count() == 1 else
                    done % train_config.log_every == 0 and _agree(bool(stop)))
        will_save = done % train_config.save_every == 0 or stopping
        if (done % train_config.log_every == 0 or is_last or will_save
            or done == start_step + 1):
          last_metrics = {k: float(v) for k, v in jax.device_get(metrics).items()}
          elapsed = time.perf_counter() - interval_start
          rate = tokens_per_step * interval_steps / elapsed
          throughput = {'tokens_per_sec': rate}
          if flops_per_token and peak:
            throughput['mfu'] = rate * flops_per_token / (peak * jax.device_count())
          if lead:
            metrics_log.write(step=done, **last_metrics, **throughput)
          if not math.isfinite(last_metrics['loss']):
            save(done, last_metrics)  # Raises: nothing non-finite is ever saved.
          if lead:
            progress.update(done, last_metrics['loss'], rate)
          interval_start, interval_steps = time.perf_counter(), 0
        if done % train_config.eval_every == 0 and not is_last:
          eval_loss = run_eval(done)['eval_loss']
          if lead:
            progress.message(f'step {done}: validation loss {eval_loss:.4f}')
          interval_start, interval_steps = time.perf_counter(), 0
        if will_save:
          save(done, last_metrics)
        if stopping:
          if lead:
            progress.message('')
          raise Interrupted(f'stopped at step {done}; checkpoint saved in '
                            f'{checkpoints.directory}; run the same command to resume',
                            stop[0] if stop else signal.SIGTERM)
    final_step = max(start_step, train_config.steps)
    final_metrics = run_eval(final_step)
    save(final_step, last_metrics)
  finally:
    checkpoints.close()
  summary = {'step': final_step, **final_metrics, 'initial_eval_loss': initial_loss}
  return params, graphdef, task.tokenizer, summary
