"""The workdir lock: one holder at a time; a dead holder of this host is taken over, one of
another host is not; the file goes with its holder."""
import json
import os
import signal
import socket
import subprocess
import sys

import pytest

from conftest import ROOT
from lmlab.training.workdir import WorkdirError, lock_path, locked

HOLD = ('import sys, time\n'
        'from lmlab.training.workdir import locked\n'
        'with locked(sys.argv[1]):\n'
        '  print("held", flush=True)\n'
        '  time.sleep(600)\n')


def write_holder(workdir, pid, host):
  workdir.mkdir(exist_ok=True)
  with open(lock_path(str(workdir)), 'w') as f:
    json.dump({'pid': pid, 'host': host}, f)


def ended_pid():
  process = subprocess.Popen([sys.executable, '-c', ''])
  process.wait()
  return process.pid


def test_a_live_holder_is_named_and_a_killed_one_taken_over(tmp_path):
  workdir = str(tmp_path / 'run')
  holder = subprocess.Popen([sys.executable, '-c', HOLD, workdir], cwd=ROOT,
                            stdout=subprocess.PIPE, text=True)
  try:
    assert holder.stdout.readline() == 'held\n'
    with pytest.raises(WorkdirError, match=f'in use by process {holder.pid} on '
                                           f'{socket.gethostname()}'):
      with locked(workdir):
        pass
  finally:
    holder.send_signal(signal.SIGKILL)
    holder.wait()
  notes = []
  with locked(workdir, note=notes.append):
    with open(lock_path(workdir)) as f:
      assert json.load(f) == {'pid': os.getpid(), 'host': socket.gethostname()}
  assert len(notes) == 1 and f'process {holder.pid}' in notes[0] and 'took over' in notes[0]
  assert not os.path.exists(lock_path(workdir))


def test_a_lock_file_of_an_ended_process_is_taken_over(tmp_path):
  pid = ended_pid()
  write_holder(tmp_path, pid, socket.gethostname())
  notes = []
  with locked(str(tmp_path), note=notes.append):
    pass
  assert f'process {pid}' in notes[0]
  assert not os.path.exists(lock_path(str(tmp_path)))


def test_a_lock_of_another_host_is_left_to_the_user(tmp_path):
  write_holder(tmp_path, ended_pid(), 'elsewhere-' + socket.gethostname())
  before = (tmp_path / 'lock').read_text()
  with pytest.raises(WorkdirError, match='another host.*delete that file'):
    with locked(str(tmp_path)):
      pass
  assert (tmp_path / 'lock').read_text() == before


def test_the_lock_is_released_when_the_run_fails(tmp_path):
  with pytest.raises(ValueError):
    with locked(str(tmp_path)):
      raise ValueError('the run failed')
  with locked(str(tmp_path), note=pytest.fail):  # A file left behind would be taken over.
    pass
