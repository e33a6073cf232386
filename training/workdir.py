"""A run's workdir: config.json (the resolved config), metrics.jsonl, tokens/, checkpoints/,
and `lock` while a training run uses it.

config.json is written when a run starts and never rewritten; a later run in the same
workdir must describe the same model, tokenizer and data, or it is refused. Its "environment"
records what the run started with (training/provenance.py).
"""
import contextlib
import json
import os
import socket
import time

try:
  import fcntl
except ImportError:  # Windows: the lock file alone.
  fcntl = None

from lmlab.models import config as model_config_lib
from lmlab.training import provenance

CONFIG_FILE = 'config.json'
LOCK_FILE = 'lock'
# What a checkpoint means depends on these; the training schedule may change on resume.
MUST_MATCH = ('model', 'tokenizer', 'tokenizer_pattern', 'data', 'val_fraction')
# Model fields that change how a step runs, not what a checkpoint holds.
MAY_CHANGE = ('remat', 'attention_impl')


class WorkdirError(RuntimeError):
  """A workdir that does not fit the requested run."""


def config_path(workdir: str) -> str:
  return os.path.join(workdir, CONFIG_FILE)


def read_config(workdir: str) -> dict:
  path = config_path(workdir)
  if not os.path.exists(path):
    raise WorkdirError(f'{path} not found: --workdir must be the folder of a training run')
  try:
    with open(path, encoding='utf-8') as f:
      resolved = json.load(f)
  except (ValueError, RecursionError) as e:
    raise WorkdirError(f'{path} is not UTF-8 JSON ({e})') from None
  if not isinstance(resolved, dict) or 'model' not in resolved:
    raise WorkdirError(f'{path} is not a run config: expected a JSON object with a "model" '
                       'object of ModelConfig fields')
  try:
    resolved['model'] = model_config_lib.from_dict(resolved['model']).validate()
  except model_config_lib.ConfigError as e:
    raise WorkdirError(f'{path}: "model" is not a valid model config ({e})') from None
  return resolved


def _differences(old: dict, new: dict):
  for key in MUST_MATCH:
    before, after = old.get(key), new.get(key)
    if isinstance(before, dict) and isinstance(after, dict):
      for field in sorted(set(before) | set(after)):
        if key == 'model' and field in MAY_CHANGE:
          continue
        if before.get(field) != after.get(field):
          yield f'{key}.{field}: {before.get(field)!r} -> {after.get(field)!r}'
    elif before != after:
      yield f'{key}: {before!r} -> {after!r}'


def record_config(workdir: str, resolved: dict):
  """Writes config.json for a new run, or checks that a resumed run matches it."""
  resolved = {**resolved, 'model': model_config_lib.to_dict(resolved['model'])}
  path = config_path(workdir)
  if os.path.exists(path):
    with open(path) as f:
      try:
        previous = json.load(f)
      except ValueError:
        raise WorkdirError(f'{path} is not valid JSON; use a new --workdir') from None
    try:  # Written by an earlier version: compare in today's form.
      previous['model'] = model_config_lib.to_dict(model_config_lib.from_dict(previous['model']))
    except (KeyError, TypeError, model_config_lib.ConfigError) as e:
      raise WorkdirError(f'{path} is not a valid run config ({e}); use a new --workdir') from None
    changed = list(_differences(previous, resolved))
    if changed:
      raise WorkdirError(f'{workdir} holds a run with a different config ({"; ".join(changed)});'
                         ' use the same flags to resume it, or a new --workdir')
    return
  os.makedirs(workdir, exist_ok=True)
  with open(path + '.partial', 'w') as f:
    json.dump({**resolved, 'environment': provenance.describe()}, f, indent=2)
  os.replace(path + '.partial', path)


def lock_path(workdir: str) -> str:
  return os.path.join(workdir, LOCK_FILE)


@contextlib.contextmanager
def locked(workdir: str, note=print):
  """Holds <workdir>/lock, which names this process and host, so that one training run at a
  time uses the workdir; another run that finds it live stops with a WorkdirError naming the
  holder.

  The file is created atomically (O_CREAT | O_EXCL) and held under an exclusive flock that
  the kernel releases however the holder ends, so a live holder is told from a file left
  behind. A file left by a process of this host that no longer runs (killed) is taken over,
  with a note. One of another host is not: whether flock reaches across hosts depends on the
  shared file system (NFS: yes; many others: no), so that run may be alive, and the error
  says to delete the file once it is over.
  """
  os.makedirs(workdir, exist_ok=True)
  path = lock_path(workdir)
  fd = _acquire(path, note)
  try:
    yield
  finally:
    try:
      if _is_file_at(fd, path):
        os.unlink(path)
    finally:
      os.close(fd)


def _acquire(path: str, note) -> int:
  """The open lock file, written with this process's pid and host and flocked where the file
  system can."""
  while True:
    try:
      fd, created = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o644), True
    except FileExistsError:
      try:
        fd, created = os.open(path, os.O_RDWR), False
      except FileNotFoundError:  # Released in between.
        continue
    flocked = _flock(fd)
    if flocked is not False and not _is_file_at(fd, path):
      os.close(fd)  # Released (deleted) in between: take the next one.
      continue
    holder = _read_holder(fd)
    if flocked is False:
      os.close(fd)
      raise WorkdirError(_in_use_message(path, holder))
    if not created:
      if holder.get('host') != socket.gethostname():
        os.close(fd)
        raise WorkdirError(
            f'{os.path.dirname(path)} is locked by {_describe(holder)} (lock file {path}); a '
            'lock of another host is not taken over: delete that file once that run is over')
      if not (flocked or _process_ended(holder['pid'])):  # Without flock: by the pid.
        os.close(fd)
        raise WorkdirError(_in_use_message(path, holder))
      note(f'note: took over {path} from {_describe(holder)}, which no longer runs')
    os.ftruncate(fd, 0)
    os.lseek(fd, 0, os.SEEK_SET)
    os.write(fd, json.dumps({'pid': os.getpid(), 'host': socket.gethostname()}).encode())
    os.fsync(fd)
    return fd


def _flock(fd: int, patience_seconds: float = 1.0) -> bool | None:
  """True: held now; False: a live process holds it; None: flock is not available here.
  A run checking a lock file holds its flock for an instant, hence the patience."""
  if fcntl is None:
    return None
  deadline = time.monotonic() + patience_seconds
  while True:
    try:
      fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
      return True
    except BlockingIOError:
      if time.monotonic() > deadline:
        return False
      time.sleep(0.05)
    except OSError:  # Not supported by this file system.
      return None


def _is_file_at(fd: int, path: str) -> bool:
  try:
    at_path = os.stat(path)
  except FileNotFoundError:
    return False
  held = os.fstat(fd)
  return (held.st_dev, held.st_ino) == (at_path.st_dev, at_path.st_ino)


def _read_holder(fd: int) -> dict:
  """{'pid': ..., 'host': ...}; empty while its writer has yet to write it."""
  try:
    os.lseek(fd, 0, os.SEEK_SET)
    holder = json.loads(os.read(fd, 4096))
  except ValueError:
    return {}
  return holder if isinstance(holder, dict) else {}


def _process_ended(pid) -> bool:
  """Whether no process `pid` runs on this host (elsewhere than POSIX: assumed running)."""
  if pid == os.getpid():
    return True
  if os.name != 'posix':  # Windows' os.kill would end the process.
    return False
  try:
    os.kill(pid, 0)
  except ProcessLookupError:
    return True
  except PermissionError:  # It runs, as another user.
    return False
  return False


def _describe(holder: dict) -> str:
  if not holder:
    return 'a run that has yet to write its pid'
  return f'process {holder["pid"]} on {holder["host"]}'


def _in_use_message(path: str, holder: dict) -> str:
  return (f'{os.path.dirname(path)} is in use by {_describe(holder)} (lock file {path}); wait '
          'for that run to end or stop it, or use another --workdir')
