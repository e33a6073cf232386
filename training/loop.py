"""train(): a run from its configs to its final parameters, in its workdir.

The batch for step s is a pure function of (seed, s) and dropout keys derive from
(seed, s), so a run resumed from its checkpoint computes bitwise the same losses as an
uninterrupted one.

train() resolves the configs, makes the objective (training/objective.py; by name from
training/objectives.py) and the mesh, initialises or restores the state, compiles the step
once and hands it to a Trainer (training/trainer.py) with a run's hooks: metrics and
progress, the non-finite guard, evaluation and checkpoints.
"""
import contextlib
import dataclasses
import functools

import jax
import numpy as np
from flax import nnx
from jax.experimental import multihost_utils

from lmlab.data.errors import DataError
from lmlab.models import sharding
from lmlab.models.config import ModelConfig
from lmlab.models.errors import ConfigError
from lmlab.models.registry import abstract_model, active_param_count, build, param_count
from lmlab.training import mfu as mfu_lib
from lmlab.training import eval_tasks, objectives, scoring
from lmlab.training import parallel, wandb_log
from lmlab.training import steps as steps_lib
from lmlab.training import workdir as workdir_lib
from lmlab.training.checkpoint import Checkpoints
from lmlab.training.config import TrainConfig
from lmlab.training.metrics import MetricsLog, Progress
from lmlab.training.optimizer import OptimizerConfig, make_optimizer, schedule
from lmlab.training.trainer import (CheckpointHook, EvalHook, MetricsHook, NonFiniteGuard,
                                    Trainer, TrainState)


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


def _parameter_sizes(state: TrainState, trainable, model_config: ModelConfig) -> dict:
  """How many parameters train, of how many (a QLoRA kernel counting the values it stands
  for, not its codes), and the optimizer state's bytes per device: the memory a fine-tuning
  method saves."""
  count = lambda tree: sum(leaf.size for leaf in jax.tree.leaves(tree))
  total = param_count(model_config)
  trained = count(steps_lib.trainable_part(state.params, trainable))
  return {'params': total, 'active_params': active_param_count(model_config),
          'trainable_params': trained, 'trainable_share': trained / total,
          'opt_state_bytes_per_device': parallel.bytes_per_device(state.opt_state)}


def train(train_config: TrainConfig, model_config: ModelConfig, opt_config: OptimizerConfig,
          *, print_fn=print, init_params=None, objective=None):
  """Trains (or resumes) in train_config.workdir; returns (params, graphdef, tokenizer, summary).

  objective(train_config, model_config, log=print_fn) makes the objective; default: the one
  train_config.objective names. The summary holds its final eval metrics.

  init_params(params) -> params, when given, replaces the freshly initialised parameters of a
  new run (another initialisation, or weights to fine-tune); a resumed run ignores it.

  The state lives on the mesh of train_config.mesh (training/parallel.py); with several
  processes, only process 0 holds the workdir's lock (training/workdir.py) and writes the
  config, metrics and progress, and every process takes part in each checkpoint.
  """
  model_config.validate()
  if model_config.quantize:
    raise ConfigError(f'quantize={model_config.quantize!r} holds frozen integer kernels, which do '
                      'not train; train float kernels (with qat=<spec> to train for '
                      'quantisation) and quantise with --mode=convert --quantize')
  train_config = train_config.resolved(model_config).validate()
  if train_config.eval_tasks:
    scoring.check_decoder(model_config, '--eval_tasks')
    eval_tasks.parse(train_config.eval_tasks, '--eval_tasks')
  opt_config = opt_config.resolved(train_config.steps * train_config.updates_per_step,
                                   model_config.family)
  make_objective = objective or objectives.by_name(train_config.objective)
  layout = parallel.Layout.create(train_config.mesh, train_config.logical_rules, model_config)
  if train_config.micro_batch_size % layout.batch_ways():
    raise ConfigError(f'a micro-batch of {train_config.micro_batch_size} sequences does not '
                      f'split over the {layout.batch_ways()} devices of the batch axes of '
                      f'--mesh={train_config.mesh}; make --batch_size / --grad_accum a '
                      'multiple of them')
  lead = jax.process_index() == 0
  if not lead:
    print_fn = lambda *args, **kwargs: None

  with contextlib.ExitStack() as held:

    def prepare():
      if lead:  # Before anything is written into the workdir.
        held.enter_context(workdir_lib.locked(train_config.workdir, note=print_fn))
      task = make_objective(train_config, model_config, log=print_fn)
      if lead:
        workdir_lib.record_config(train_config.workdir, {
            'model': task.model_config, **dataclasses.asdict(train_config),
            'optimizer': dataclasses.asdict(opt_config)})
      task.load_data()
      return task

    task = _process_zero_first(prepare)
    task.put_batch = layout.put_batch
    with sharding.activation_rules(layout.rules):
      return _run(train_config, opt_config, task, layout, print_fn=print_fn,
                  init_params=init_params, lead=lead)


def _initial_state(task, train_config, layout, checkpoints, init_opt_state, init_params,
                   print_fn):
  """(state, the step it is at, shardings of params and optimizer state, a function of the
  run's initial parameters) of a new or resumed run."""

  def new_params():
    return nnx.split(build(task.model_config, rngs=nnx.Rngs(params=train_config.seed)))[1]

  abstract_params = jax.eval_shape(new_params)
  params_at = layout.state_shardings(abstract_params)
  opt_state_at = layout.state_shardings(jax.eval_shape(init_opt_state, abstract_params))

  def initial_params():
    params = jax.jit(new_params, out_shardings=params_at)()
    return params if init_params is None else jax.device_put(init_params(params), params_at)

  resumed = checkpoints.resume(abstract_params, init_opt_state, step=train_config.resume_step,
                               place=layout.abstract, warn=print_fn)
  if resumed is None:
    step, params, opt_state = 0, initial_params(), None
  else:
    step, params, opt_state, _ = resumed
    print_fn(f'resumed from checkpoint {step} in {checkpoints.directory}')
  if opt_state is None:
    opt_state = jax.jit(init_opt_state, out_shardings=opt_state_at)(params)
  return TrainState(params, opt_state), step, (params_at, opt_state_at), initial_params


def _evaluation(task, train_config, graphdef):
  """params -> the objective's eval metrics, and those of --eval_tasks."""
  if not train_config.eval_tasks:
    return functools.partial(task.evaluate, graphdef)
  suite = eval_tasks.for_run(train_config.eval_tasks, train_config, task.tokenizer,
                             flag='--eval_tasks')
  return lambda params: {**task.evaluate(graphdef, params),
                         **eval_tasks.flat(suite.run(graphdef, params))}


def _hooks(task, train_config, graphdef, checkpoints, log, *, lead: bool, peak_flops):
  progress = Progress(train_config.steps) if lead else None
  model_config = task.model_config
  flops_per_token = (mfu_lib.train_flops_per_token(model_config, train_config.seq_len)
                     if model_config.family == 'decoder' else None)
  return [
      MetricsHook(log, progress, log_every=train_config.log_every,
                  tokens_per_step=train_config.batch_size * train_config.seq_len,
                  flops_per_token=flops_per_token, peak_flops=peak_flops),
      NonFiniteGuard(checkpoints),
      EvalHook(_evaluation(task, train_config, graphdef), log, progress,
               eval_every=train_config.eval_every),
      CheckpointHook(checkpoints, {'seed': train_config.seed, 'tokenizer': train_config.tokenizer,
                                   'config': workdir_lib.config_path(train_config.workdir)}),
  ]


def _run(train_config, opt_config, task, layout, *, print_fn, init_params, lead):
  model_config = task.model_config
  graphdef = nnx.graphdef(abstract_model(model_config))
  optimizer = make_optimizer(opt_config)
  init_opt_state = lambda params: optimizer.init(steps_lib.trainable_part(params,
                                                                          task.trainable))
  checkpoints = Checkpoints(train_config.workdir, keep=train_config.keep_checkpoints)
  state, start_step, (params_at, opt_state_at), initial_params = _initial_state(
      task, train_config, layout, checkpoints, init_opt_state, init_params, print_fn)
  frozen = task.frozen(initial_params)
  param_bytes = parallel.bytes_per_device(state.params)
  sizes = _parameter_sizes(state, task.trainable, model_config)
  print_fn(f'mesh {dict(layout.mesh.shape)} on {jax.device_count()} devices '
           f'({jax.process_count()} processes); parameters: {param_bytes / 2**20:.1f} MiB '
           f'on the fullest device; trains {sizes["trainable_params"]:,} of '
           f'{sizes["params"]:,} ({sizes["trainable_share"]:.2%}'
           + (f'; {sizes["active_params"]:,} active per token'
              if sizes['active_params'] != sizes['params'] else '') + '), optimizer state '
           f'{sizes["opt_state_bytes_per_device"] / 2**20:.1f} MiB')

  def batch_at(step, params):
    batch = task.train_batch(step, params) if task.online else task.train_batch(step)
    micro_batches = {k: np.asarray(v).reshape(train_config.grad_accum, -1, *np.shape(v)[1:])
                     for k, v in batch.items()}
    return layout.put_batch(micro_batches, batch_axis=1)

  first_batch = batch_at(start_step, state.params)
  step = steps_lib.make_train_step(
      graphdef, optimizer, schedule(opt_config), seed=train_config.seed,
      use_dropout=model_config.dropout_rate > 0 or model_config.lora_dropout > 0,
      z_loss=train_config.z_loss, max_z_loss=train_config.max_z_loss, loss_fn=task.loss,
      trainable=task.trainable, prepare=task.prepare, updates=train_config.updates_per_step,
      minibatches=train_config.minibatches,
      shardings=(params_at, opt_state_at, {k: v.sharding for k, v in first_batch.items()},
                 layout.replicated, jax.tree.map(lambda x: x.sharding, frozen)))
  compiled = step.lower(state.params, state.opt_state, first_batch,
                        layout.put_replicated(np.int32(start_step)), frozen).compile()
  memory = _compiled_memory(compiled)
  if 'step_temp_bytes' in memory:
    print_fn(f'compiled step: {memory["step_temp_bytes"] / 2**20:.1f} MiB of temporaries per '
             'device')
  log = None
  if lead:
    try:
      log = MetricsLog(train_config.workdir, also=[wandb_log.WandbLog(
          train_config.workdir, train_config.wandb, train_config.wandb_project,
          wandb_log.config_of(train_config.workdir))] if train_config.wandb else [])
    except BaseException:
      checkpoints.close()
      raise
  if log is not None:
    log.write(step=start_step, param_bytes_per_device=param_bytes, devices=jax.device_count(),
              **sizes, **memory)
  hooks = _hooks(task, train_config, graphdef, checkpoints, log, lead=lead,
                 peak_flops=(train_config.peak_flops
                             or mfu_lib.peak_flops(jax.devices()[0].device_kind)))
  trainer = Trainer(
      lambda params, opt_state, batch, step: compiled(
          params, opt_state, batch, layout.put_replicated(np.int32(step)), frozen),
      batch_at, hooks, save_every=train_config.save_every, log_every=train_config.log_every,
      resume_hint=f'checkpoint saved in {checkpoints.directory}; run the same command to resume')
  try:
    state = trainer.run(state, start_step, train_config.steps)
  finally:
    checkpoints.close()
    if log is not None:
      log.close()
  evaluation = hooks[2]
  summary = {'step': max(start_step, train_config.steps), **evaluation.final,
             'initial_eval_loss': evaluation.initial and evaluation.initial['eval_loss']}
  return state.params, graphdef, task.tokenizer, summary
