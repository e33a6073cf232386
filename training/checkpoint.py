"""Orbax checkpoints of a run: parameters, optimizer state and a JSON record.

The record holds the step, the seed, the data cursor, the resolved config and the
tokenizer reference, so a checkpoint says by itself how to continue it. A checkpoint
converted from another format holds parameters only and says so (`params_only` in its
record); a run continuing it starts a fresh optimizer state.

Orbax writes a step into `<step>.orbax-checkpoint-tmp` and renames it to `<step>` once it is
complete, so a save that fails half way (disk full) never becomes a step; a training run
removes such leftovers when it opens the folder.
"""
import contextlib
import functools
import logging
import os
import sys
import traceback

import jax
import orbax.checkpoint as ocp
from jax.experimental import multihost_utils

from lmlab.models.errors import CheckpointError


class UnreadableCheckpoint(CheckpointError):
  """A step whose files cannot be read (corrupted, truncated)."""

  def __init__(self, directory: str, step: int, reason: str):
    super().__init__(f'checkpoint {step} in {directory} cannot be read ({reason}); training '
                     'in this workdir without --resume_step moves it aside and resumes from '
                     'the newest readable checkpoint')
    self.step, self.reason = step, reason


def _reason(error: Exception) -> str:
  """The first line of the message; of a long one, its start and its end (the OS's error)."""
  line = str(error).splitlines()[0] if str(error) else type(error).__name__
  return line if len(line) <= 240 else f'{line[:120]} ... {line[-120:]}'


def _not_about_orbax(record: logging.LogRecord) -> bool:
  """False for an error Orbax logs (through absl) and asyncio's report of an Orbax task."""
  files = [record.pathname] + [frame.filename for frame in traceback.extract_tb(
      record.exc_info[2] if record.exc_info else None)]
  return record.levelno < logging.ERROR or not any('orbax' in name for name in files)


def _unless_abandoned(report, unraisable):
  coroutine = getattr(unraisable.object, 'cr_code', None)
  if not ('Event loop is closed' in str(unraisable.exc_value)
          or coroutine is not None and 'orbax' in coroutine.co_filename):
    report(unraisable)


_NOISY_LOGGERS = ('absl', 'asyncio')


@contextlib.contextmanager
def _failure_reported_once():
  """Around an Orbax save or restore. A failure is logged by each of Orbax's threads, then
  reported again by every read or write still in flight (asyncio's dropped tasks, and
  TensorStore's callbacks on the event loop Orbax has closed, as unraisable exceptions) until
  the process ends; the CheckpointError raised instead says it once."""
  report = sys.unraisablehook
  if isinstance(report, functools.partial) and report.func is _unless_abandoned:
    yield  # An earlier failure left the filters in place for good.
    return
  for name in _NOISY_LOGGERS:
    logging.getLogger(name).addFilter(_not_about_orbax)
  sys.unraisablehook = functools.partial(_unless_abandoned, report)
  yield
  for name in _NOISY_LOGGERS:  # Only after a success.
    logging.getLogger(name).removeFilter(_not_about_orbax)
  sys.unraisablehook = report


def _on_first_device(abstract_state):
  device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
  return jax.tree.map(lambda leaf: jax.ShapeDtypeStruct(leaf.shape, leaf.dtype, sharding=device),
                      abstract_state)


class Checkpoints:
  """The checkpoints/ folder of a workdir. read_only: creates, moves and removes nothing
  there (--mode=eval/generate/convert read a workdir that a training run may be using)."""

  def __init__(self, workdir: str, *, keep: int = 3, read_only: bool = False):
    self.directory = os.path.join(os.path.abspath(workdir), 'checkpoints')
    self.manager = ocp.CheckpointManager(
        self.directory,
        options=ocp.CheckpointManagerOptions(
            max_to_keep=keep, create=not read_only, cleanup_tmp_directories=not read_only,
            enable_async_checkpointing=False),
        item_names=('state', 'record'))

  def latest_step(self):
    return self.manager.latest_step()

  def save(self, step: int, state, record: dict):
    if step in self.manager.all_steps():
      return
    try:
      with _failure_reported_once():
        self.manager.save(step, args=ocp.args.Composite(state=ocp.args.StandardSave(state),
                                                         record=ocp.args.JsonSave(record)))
    except Exception as e:  # Disk full, a write error: Orbax and TensorStore raise many kinds.
      latest = self.latest_step()
      kept = 'there is no earlier one' if latest is None else f'checkpoint {latest} is kept'
      raise CheckpointError(f'saving checkpoint {step} in {self.directory} failed '
                            f'({_reason(e)}); {kept}. Free space or fix the write error, then '
                            'run the same command to resume') from e

  def read_record(self, step: int) -> dict:
    try:
      with _failure_reported_once():
        return self.manager.restore(step, args=ocp.args.Composite(
            record=ocp.args.JsonRestore()))['record']
    except Exception as e:  # Orbax raises many kinds; all mean the same to the user.
      raise UnreadableCheckpoint(self.directory, step, _reason(e)) from e

  def restore(self, step: int, abstract_params, init_opt_state, *, place=None):
    """(params, optimizer state or None, record) of `step`, shaped like abstract_params.

    init_opt_state(params) gives the optimizer state's shapes, and is skipped (None is
    returned) for a parameters-only checkpoint. place(abstract state) adds the shardings to
    restore onto (training.parallel.Layout.abstract), whatever mesh the checkpoint was saved
    from; by default every array goes whole to this process's first device.
    """
    record = self.read_record(step)
    place = place or _on_first_device
    if record.get('params_only'):
      return self.restore_state(step, place({'params': abstract_params}))['params'], None, record
    state = self.restore_state(step, place({
        'params': abstract_params, 'opt_state': jax.eval_shape(init_opt_state, abstract_params)}))
    return state['params'], state['opt_state'], record

  def restore_state(self, step: int, abstract_state):
    """The saved state, shaped and typed like `abstract_state` (from jax.eval_shape)."""
    try:
      with _failure_reported_once():
        restored = self.manager.restore(step, args=ocp.args.Composite(
            state=ocp.args.StandardRestore(abstract_state)))['state']
    except Exception as e:
      raise UnreadableCheckpoint(self.directory, step, _reason(e)) from e
    saved = jax.tree.map(lambda x: (x.shape, x.dtype), restored)
    wanted = jax.tree.map(lambda x: (x.shape, x.dtype), abstract_state)
    if saved != wanted:
      raise CheckpointError(f'checkpoint {step} in {self.directory} does not match the model '
                            'config; use the config it was made with or a new --workdir')
    return restored

  def resume(self, abstract_params, init_opt_state, *, step: int | None = None, place=None,
             warn=print):
    """(step, params, optimizer state or None, record) that a training run continues from,
    or None for a new run (no checkpoint); place as for restore().

    step=None: the newest readable checkpoint. Newer ones that cannot be read (a corrupted
    file) are named in a warning and moved aside to `<step>.unreadable`, where Orbax neither
    lists, deletes (keep_checkpoints) nor calls them the latest. This is the default, rather
    than stopping until --resume_step is given, because a run is a pure function of (seed,
    step): continuing from an earlier checkpoint recomputes the lost steps bit for bit, at
    the cost of their time, and a job restarted after a preemption goes on by itself. When no
    checkpoint is readable, nothing is moved and CheckpointError is raised: starting from
    scratch would silently drop the weights a converted workdir starts from.

    step=N: checkpoint N, which must be readable; the newer ones are moved aside to
    `<step>.superseded`, so that this run saves its own at their steps.

    With several processes, every one reads the same steps (a corruption of shared storage
    fails them alike) and process 0 moves the folders.
    """
    steps = sorted(self.manager.all_steps(), reverse=True)
    if step is not None:
      if step not in steps:
        raise CheckpointError(f'--resume_step={step}: {self.directory} has no checkpoint '
                              f'{step} (it holds {", ".join(map(str, steps)) or "none"})')
      restored = self.restore(step, abstract_params, init_opt_state, place=place)
      for newer in steps[:steps.index(step)]:
        warn(f'--resume_step={step}: checkpoint {newer} moved to '
             f'{self._move_aside(newer, "superseded")}')
      self._reload()
      return (step, *restored)
    unreadable = []
    for candidate in steps:
      try:
        restored = self.restore(candidate, abstract_params, init_opt_state, place=place)
      except UnreadableCheckpoint as e:
        unreadable.append(e)
        continue
      for error in unreadable:
        warn(f'warning: checkpoint {error.step} in {self.directory} cannot be read '
             f'({error.reason}); moved to {self._move_aside(error.step, "unreadable")}, '
             f'resuming from checkpoint {candidate}')
      self._reload()
      return (candidate, *restored)
    if unreadable:
      raise CheckpointError(
          f'no checkpoint in {self.directory} can be read (checkpoint {unreadable[0].step}: '
          f'{unreadable[0].reason}); move the step folders away to start the run again, or '
          'use a new --workdir')
    return None

  def _move_aside(self, step: int, suffix: str) -> str:
    """Renames the folder of `step` to <step>.<suffix> (.<suffix>.<n> where that is taken,
    from an earlier time); returns the new path."""
    source = os.path.join(self.directory, str(step))
    target, n = f'{source}.{suffix}', 1
    while os.path.exists(target):
      n += 1
      target = f'{source}.{suffix}.{n}'
    if jax.process_index() == 0:
      os.rename(source, target)
    return target

  def _reload(self):
    """Re-reads the steps after process 0 moved folders."""
    if jax.process_count() > 1:
      multihost_utils.sync_global_devices('lmlab checkpoints moved aside')
    self.manager.reload()

  def close(self):
    self.manager.wait_until_finished()
    self.manager.close()
