"""<workdir>/eval_results.json: a list to which each --mode=eval of the run appends one entry
per task: what was measured, of which checkpoint, on which data, with which settings, and
the environment it ran in (training/provenance.py)."""
import fcntl
import json
import os

from lmlab.training import provenance
from lmlab.training.workdir import WorkdirError

RESULTS_FILE = 'eval_results.json'


def results_path(workdir: str) -> str:
  return os.path.join(workdir, RESULTS_FILE)


def append(workdir: str, task: str, metrics: dict, *, step: int | None, settings: dict):
  """Adds an entry to the workdir's results; an existing file that is not such a list is
  left as it is, with a WorkdirError."""
  path = results_path(workdir)
  # Evaluations of the same run may end together: each reads and rewrites the file holding
  # an exclusive flock on the workdir folder itself (the training run's lock is a file in it).
  folder = os.open(workdir, os.O_RDONLY)
  try:
    fcntl.flock(folder, fcntl.LOCK_EX)
    _append(path, {'task': task, 'metrics': metrics, 'step': step, 'settings': settings,
                   'environment': provenance.describe()})
  finally:
    os.close(folder)


def _append(path: str, entry: dict):
  entries = []
  if os.path.exists(path):
    try:
      with open(path, encoding='utf-8') as f:
        entries = json.load(f)
    except (ValueError, UnicodeDecodeError) as e:
      raise WorkdirError(f'{path} is not JSON ({e}); move it away to record new results') \
          from None
    if not isinstance(entries, list):
      raise WorkdirError(f'{path} is not a list of results; move it away to record new results')
  entries.append(entry)
  with open(path + '.partial', 'w', encoding='utf-8') as f:
    json.dump(entries, f, indent=2)
  os.replace(path + '.partial', path)
