"""What a run was made with, recorded as "environment" in its config.json when it starts: the
lmlab version and source commit, the versions of Python and of the libraries that compute,
the devices, the command line and the time (UTC)."""
import datetime
import importlib.metadata
import os
import platform
import subprocess
import sys

import jax

import lmlab

PACKAGES = ('jax', 'jaxlib', 'flax', 'optax', 'orbax-checkpoint', 'numpy', 'tiktoken')


def _version(package: str) -> str | None:
  try:
    return importlib.metadata.version(package)
  except importlib.metadata.PackageNotFoundError:
    return None


def source_commit() -> str | None:
  """The git commit of the lmlab source, with '+changes' when files differ from it; None
  where the source is not a git checkout (an installed copy) or git is missing."""
  source = os.path.dirname(os.path.abspath(lmlab.__file__))

  def git(*args) -> str | None:
    try:
      done = subprocess.run(['git', '-C', source, *args], capture_output=True, text=True,
                            timeout=20, check=False)
    except (OSError, subprocess.TimeoutExpired):
      return None
    return done.stdout.strip() if done.returncode == 0 else None

  commit = git('rev-parse', 'HEAD')
  if commit is None:
    return None
  changed = git('status', '--porcelain', '--untracked-files=no')
  return commit + ('+changes' if changed else '')


def describe() -> dict:
  devices = jax.devices()
  return {
      'lmlab': lmlab.__version__,
      'commit': source_commit(),
      'python': platform.python_version(),
      'packages': {name: _version(name) for name in PACKAGES},
      'devices': {'platform': devices[0].platform, 'count': len(devices),
                  'kinds': sorted({device.device_kind for device in devices}),
                  'processes': jax.process_count()},
      'command': [os.path.basename(sys.argv[0]), *sys.argv[1:]],
      'time': datetime.datetime.now(datetime.timezone.utc).isoformat(timespec='seconds'),
  }
