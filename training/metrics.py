"""metrics.jsonl (one JSON object per line) with the same numbers as TensorBoard scalars (and
W&B's, with --wandb), and the live progress line."""
import json
import math
import os
import sys
import time

from lmlab.training.tensorboard import EventsWriter


def tensorboard_tag(key: str) -> str:
  """A metric's TensorBoard tag: eval_loss -> eval/loss, loss -> train/loss; a key with a
  slash already (eval/bpb/bits_per_byte) is its own tag."""
  if '/' in key:
    return key
  return f'eval/{key[len("eval_"):]}' if key.startswith('eval_') else f'train/{key}'


class MetricsLog:
  """Appends one JSON object per line to metrics.jsonl (a resumed run continues the same
  file) and writes its numbers to an events file of the workdir (training/tensorboard.py),
  which `tensorboard --logdir` shows, and to the writers in `also` (training/wandb_log.py).
  Each write is flushed, so a killed run loses nothing it logged."""

  def __init__(self, workdir: str, also=()):
    self.workdir, self.path = workdir, os.path.join(workdir, 'metrics.jsonl')
    self._events, self._also = None, list(also)

  def write(self, **fields):
    with open(self.path, 'a') as f:
      f.write(json.dumps(fields) + '\n')
    if self._events is None:
      self._events = EventsWriter(self.workdir)
    scalars = {tensorboard_tag(key): value for key, value in fields.items()
               if key != 'step' and isinstance(value, (int, float))
               and not isinstance(value, bool)}
    for writer in (self._events, *self._also):
      writer.scalars(fields['step'], scalars)

  def close(self):
    for writer in (self._events, *self._also):
      if writer is not None:
        writer.close()


def read(workdir: str, keep=lambda entry: isinstance(entry, dict)) -> list[dict]:
  """The lines of a workdir's metrics.jsonl for which keep(entry) holds; any other line (one
  that a killed run cut short) is skipped with a warning on stderr."""
  path = os.path.join(workdir, 'metrics.jsonl')
  entries = []
  with open(path, encoding='utf-8', errors='replace') as f:
    for number, line in enumerate(f, 1):
      if not line.strip():
        continue
      try:
        entry = json.loads(line)
      except (ValueError, RecursionError):
        entry = None
      if keep(entry):
        entries.append(entry)
      else:
        print(f'warning: {path}, line {number}, is not a metrics line (cut short by a killed '
              f'run?); skipped: {line.strip()[:80]!r}', file=sys.stderr)
  return entries


def _duration(seconds: float) -> str:
  seconds = int(seconds)
  return f'{seconds // 60}m{seconds % 60:02d}s' if seconds >= 60 else f'{seconds}s'


class Progress:
  """`step 120/600 | loss 2.345 | 41.2k tok/s | ETA 1m23s`, redrawn in place on a terminal."""

  def __init__(self, total_steps: int, stream=None):
    # sys.stdout as it is now, not as it was at import (tests swap it per test).
    self.total, self.stream = total_steps, stream or sys.stdout
    self.live = self.stream.isatty()
    self.started = time.perf_counter()
    self.first_step = None

  def update(self, step: int, loss: float, tokens_per_sec: float):
    now = time.perf_counter()
    if self.first_step is None:
      self.first_step, self.started = step, now
    done = step - self.first_step
    eta = (now - self.started) / done * (self.total - step) if done else math.nan
    line = (f'step {step}/{self.total} | loss {loss:.4f} | {tokens_per_sec / 1e3:.1f}k tok/s'
            f' | ETA {_duration(eta) if math.isfinite(eta) else "?"}')
    self.stream.write(('\r' + line + '\033[K') if self.live else line + '\n')
    self.stream.flush()

  def message(self, text: str):
    """A line of its own that does not garble the progress line."""
    self.stream.write(('\r\033[K' if self.live else '') + text + '\n')
    self.stream.flush()
