"""The trainer: a compiled step run from a start step to the last, and the hooks that watch it.

  state = Trainer(step, batch_at, hooks, save_every=..., log_every=...).run(state, start, end)

The loop itself only steps, agrees with the other processes on a stop request and calls the
hooks in order after every step; everything else is a hook: metrics and progress
(MetricsHook), the non-finite guard (NonFiniteGuard), evaluation (EvalHook) and checkpoints
(CheckpointHook). A hook reads the state from the event it is handed, never from a variable
the loop rebinds.
"""
import contextlib
import dataclasses
import math
import signal
import time
from typing import Any, Callable

import jax
import numpy as np
from jax.experimental import multihost_utils


class TrainingError(RuntimeError):
  """Training cannot go on (for example a non-finite loss)."""


class Interrupted(Exception):
  """SIGINT or SIGTERM arrived; the state was saved first."""

  def __init__(self, message: str, signum: int):
    super().__init__(message)
    self.exit_code = 128 + signum


@dataclasses.dataclass(frozen=True)
class TrainState:
  params: Any
  opt_state: Any


@dataclasses.dataclass
class StepEnd:
  """What the hooks see after a step: `step` steps are done."""
  step: int
  state: TrainState
  device_metrics: dict
  first: bool      # The first step of this run (a resumed run's too).
  last: bool
  save: bool       # A checkpoint is due: a save_every step, or a stop request.
  stopping: bool
  _fetched: dict | None = None

  def metrics(self) -> dict:
    """The step's metrics as Python floats, fetched from the devices once."""
    if self._fetched is None:
      self._fetched = {k: float(v) for k, v in jax.device_get(self.device_metrics).items()}
    return self._fetched

  @property
  def fetched(self) -> bool:
    return self._fetched is not None


class Hook:
  """Called by Trainer.run; every method may be left out."""
  pauses_clock = False  # True: time spent here is not training time (evaluation, saving).

  def start(self, trainer: 'Trainer', state: TrainState, step: int):
    """Before the first step; `step` steps are done."""

  def after_step(self, trainer: 'Trainer', event: StepEnd):
    """After every step."""

  def end(self, trainer: 'Trainer', state: TrainState, step: int):
    """After the last step (also when there was none to take)."""


@contextlib.contextmanager
def stop_requests():
  """Turns SIGINT/SIGTERM into a list of signal numbers the loop checks after each step."""
  received = []
  handler = lambda signum, frame: received.append(signum)
  previous = {s: signal.signal(s, handler) for s in (signal.SIGINT, signal.SIGTERM)}
  try:
    yield received
  finally:
    for s, h in previous.items():
      signal.signal(s, h)


def agree(flag: bool) -> bool:
  """True on every process when it is true on any (a stop request)."""
  if jax.process_count() == 1:
    return flag
  return bool(np.any(multihost_utils.process_allgather(np.int32(flag))))


class Trainer:
  """step(params, opt_state, batch, step) -> (params, opt_state, metrics), compiled; batch_at(
  step, params) places a step's batch (made from the parameters the step starts from, for an
  objective that samples its batches from the model). resume_hint ends the message of a stop
  request."""

  def __init__(self, step: Callable, batch_at: Callable, hooks: list[Hook], *,
               save_every: int, log_every: int, resume_hint: str = ''):
    self.step, self.batch_at, self.hooks = step, batch_at, hooks
    self.save_every, self.log_every, self.resume_hint = save_every, log_every, resume_hint
    self.paused_seconds = 0.0  # Spent in hooks that pause the clock, for throughput.

  def _call(self, hook: Hook, method: str, *args):
    started = time.perf_counter()
    getattr(hook, method)(self, *args)
    if hook.pauses_clock:
      self.paused_seconds += time.perf_counter() - started

  def _stopping(self, requests: list, done: int) -> bool:
    # A signal arriving later is seen after the next step; with several processes, at a log
    # step, where they all stop together.
    if jax.process_count() == 1:
      return bool(requests)
    return done % self.log_every == 0 and agree(bool(requests))

  def run(self, state: TrainState, start: int, end: int) -> TrainState:
    """Steps start..end-1; returns the final state."""
    for hook in self.hooks:
      self._call(hook, 'start', state, start)
    with stop_requests() as requests:
      for step in range(start, end):
        params, opt_state, metrics = self.step(state.params, state.opt_state,
                                               self.batch_at(step, state.params), step)
        state, done = TrainState(params, opt_state), step + 1
        stopping = self._stopping(requests, done)
        event = StepEnd(step=done, state=state, device_metrics=metrics, first=step == start,
                        last=done == end, save=done % self.save_every == 0 or stopping,
                        stopping=stopping)
        for hook in self.hooks:
          self._call(hook, 'after_step', event)
        if stopping:
          raise Interrupted(f'stopped at step {done}; {self.resume_hint}',
                            requests[0] if requests else signal.SIGTERM)
    for hook in self.hooks:
      self._call(hook, 'end', state, max(start, end))
    return state


class MetricsHook(Hook):
  """A metrics.jsonl line and a progress update every log_every steps, at the first and last
  step and wherever a checkpoint is due; throughput excludes the time of pausing hooks.
  log and progress are None on processes that do not report (they still fetch the metrics,
  which the non-finite guard reads on every process)."""

  def __init__(self, log, progress, *, log_every: int, tokens_per_step: int,
               flops_per_token: float | None, peak_flops: float | None):
    self.log, self.progress, self.log_every = log, progress, log_every
    self.tokens_per_step = tokens_per_step
    self.flops_per_token, self.peak_flops = flops_per_token, peak_flops

  def start(self, trainer, state, step):
    self.since = (time.perf_counter(), trainer.paused_seconds, step)

  def after_step(self, trainer, event):
    if not (event.step % self.log_every == 0 or event.first or event.last or event.save):
      return
    metrics = event.metrics()
    started, paused, since_step = self.since
    seconds = time.perf_counter() - started - (trainer.paused_seconds - paused)
    rate = self.tokens_per_step * (event.step - since_step) / seconds
    throughput = {'tokens_per_sec': rate}
    if self.flops_per_token and self.peak_flops:
      throughput['mfu'] = rate * self.flops_per_token / (self.peak_flops * jax.device_count())
    if self.log is not None:
      self.log.write(step=event.step, **metrics, **throughput)
    if self.progress is not None:
      self.progress.update(event.step, metrics['loss'], rate)
      if event.stopping:
        self.progress.message('')
    self.since = (time.perf_counter(), trainer.paused_seconds, event.step)


class NonFiniteGuard(Hook):
  """Stops the run at non-finite metrics, before anything is saved from them."""

  def __init__(self, checkpoints):
    self.checkpoints = checkpoints

  def after_step(self, trainer, event):
    if event.fetched and not all(map(math.isfinite, event.metrics().values())):
      raise TrainingError(
          f'non-finite training metrics at step {event.step} ({event.metrics()}); the last '
          f'good checkpoint ({self.checkpoints.latest_step()}) is kept. Lower --learning_rate '
          'or raise --warmup_steps')


class EvalHook(Hook):
  """The objective's evaluation at step 0 of a new run, every eval_every steps and at the
  end; `initial` and `final` hold the first and last results."""
  pauses_clock = True

  def __init__(self, evaluate: Callable, log, progress, *, eval_every: int):
    self.evaluate, self.log, self.progress = evaluate, log, progress
    self.eval_every = eval_every
    self.initial = self.final = None

  def _run(self, params, step: int, announce: bool) -> dict:
    metrics = self.evaluate(params)
    if self.log is not None:
      self.log.write(step=step, **metrics)
    if announce and self.progress is not None:
      self.progress.message(f'step {step}: validation loss {metrics["eval_loss"]:.4f}')
    return metrics

  def start(self, trainer, state, step):
    if step == 0:
      self.initial = self._run(state.params, 0, announce=True)

  def after_step(self, trainer, event):
    if event.step % self.eval_every == 0 and not event.last:
      self._run(event.state.params, event.step, announce=True)

  def end(self, trainer, state, step):
    self.final = self._run(state.params, step, announce=False)


class CheckpointHook(Hook):
  """Saves params and optimizer state with `record` where a checkpoint is due and at the end."""
  pauses_clock = True

  def __init__(self, checkpoints, record: dict):
    self.checkpoints, self.record = checkpoints, record

  def _save(self, state: TrainState, step: int):
    self.checkpoints.save(step, {'params': state.params, 'opt_state': state.opt_state},
                          {**self.record, 'step': step, 'data_cursor': step})

  def after_step(self, trainer, event):
    if event.save:
      self._save(event.state, event.step)

  def end(self, trainer, state, step):
    self._save(state, step)
