"""metrics.jsonl (one JSON object per line) and the live progress line."""
import json
import math
import os
import sys
import time


class MetricsLog:
  """Appends one JSON object per line; a resumed run continues the same file."""

  def __init__(self, workdir: str):
    self.path = os.path.join(workdir, 'metrics.jsonl')

  def write(self, **fields):
    with open(self.path, 'a') as f:
      f.write(json.dumps(fields) + '\n')


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
