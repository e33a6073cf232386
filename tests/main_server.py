"""main.py runs forked from a process that has already imported it.

Importing lmlab.main (JAX, Flax, Orbax, ...) takes about 4 of the 6 seconds of a short
main.py run on this CPU, and the suite starts well over a hundred of them. A server process
per test worker imports it once; each run is a child forked from it, which then does what
`python main.py <args>` does: the console script `lmlab.main.run()` with those arguments,
in its own working directory, environment and output files, exiting with main's exit code
(uncaught exceptions print their traceback and exit 1, as Python does).

Nothing has started a JAX backend or a thread of Python's own in the server when it forks
(checked at start), so each child starts JAX as a fresh process does. A server serves
callers whose environment is the one it started with (JAX and XLA read theirs at import;
importing lm_eval or peft in a test worker sets variables of their own): for another, `run`
replaces it with a new one.

Run as a script, this file is the server: `python main_server.py <socket path>`.
"""
import atexit
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time

# Set by pytest for each test; the only variable allowed to differ from the server's.
_PER_TEST = ('PYTEST_CURRENT_TEST',)


def _environment_key(environment) -> dict:
  return {k: v for k, v in environment.items() if k not in _PER_TEST}


class _Server:
  def __init__(self):
    self.folder = tempfile.mkdtemp(prefix='lmlab-main-')
    self.address = os.path.join(self.folder, 'socket')
    self.environment = _environment_key(os.environ)
    with open(os.path.join(self.folder, 'log'), 'wb') as log:
      self.process = subprocess.Popen([sys.executable, os.path.abspath(__file__), self.address],
                                      stdin=subprocess.DEVNULL, stdout=log, stderr=log)
    deadline = time.time() + 120
    while not os.path.exists(self.address):
      if self.process.poll() is not None or time.time() > deadline:
        with open(os.path.join(self.folder, 'log')) as f:
          raise RuntimeError(f'the main.py server did not start:\n{f.read()[-3000:]}')
      time.sleep(0.05)

  def stop(self):
    """Stops the server; runs it has forked go on to their end."""
    self.process.kill()
    self.process.wait()
    shutil.rmtree(self.folder, ignore_errors=True)


_server = None
_server_lock = threading.Lock()


def _current_server() -> _Server:
  global _server
  with _server_lock:
    if _server is not None and (_server.environment != _environment_key(os.environ)
                                or _server.process.poll() is not None):
      _server.stop()
      _server = None
    if _server is None:
      _server = _Server()
      atexit.register(_server.stop)
    return _server


def run(argv: list[str], cwd: str, timeout: float) -> subprocess.CompletedProcess:
  """`python <argv>` (argv[0] is main.py) run in cwd: a CompletedProcess with stdout and
  stderr as bytes."""
  server = _current_server()
  with tempfile.TemporaryDirectory(dir=server.folder) as outputs:
    paths = {name: os.path.join(outputs, name) for name in ('stdout', 'stderr')}
    request = {'argv': argv, 'cwd': cwd, 'environment': dict(os.environ), **paths}
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as connection:
      connection.settimeout(timeout)
      connection.connect(server.address)
      connection.sendall(json.dumps(request).encode() + b'\n')
      replies = connection.makefile('rb')
      first = replies.readline()
      if not first:
        with open(os.path.join(server.folder, 'log'), errors='replace') as f:
          raise RuntimeError(f'the main.py server failed:\n{f.read()[-3000:]}')
      pid = int(first)
      try:
        returncode = int(replies.readline())
      except TimeoutError:
        os.kill(pid, 9)
        raise subprocess.TimeoutExpired(argv, timeout) from None
    with open(paths['stdout'], 'rb') as out, open(paths['stderr'], 'rb') as err:
      return subprocess.CompletedProcess(argv, returncode, out.read(), err.read())


def _child(request):
  """In the forked child: become `python main.py <args>`."""
  os.chdir(request['cwd'])
  os.environ.clear()
  os.environ.update(request['environment'])
  for fd, path, flags in ((0, os.devnull, os.O_RDONLY),
                          (1, request['stdout'], os.O_WRONLY | os.O_CREAT | os.O_TRUNC),
                          (2, request['stderr'], os.O_WRONLY | os.O_CREAT | os.O_TRUNC)):
    opened = os.open(path, flags, 0o644)
    os.dup2(opened, fd)
    os.close(opened)
  sys.argv = list(request['argv'])
  sys.path[0] = os.path.dirname(os.path.abspath(sys.argv[0]))
  import lmlab.main
  lmlab.main.run()  # Exits through SystemExit, unwinding to the interpreter's own exit.


def _handle(connection):
  """In a forked helper: fork the run, report its pid and then its exit code."""
  with connection.makefile('rb') as lines:
    request = json.loads(lines.readline())
  pid = os.fork()
  if pid == 0:
    connection.close()
    _child(request)
    raise SystemExit(0)
  connection.sendall(f'{pid}\n'.encode())
  _, status = os.waitpid(pid, 0)
  try:
    connection.sendall(f'{os.waitstatus_to_exitcode(status)}\n'.encode())
  finally:
    os._exit(0)


def serve(address: str):
  import lmlab.main  # noqa: F401  The import every run would otherwise repeat.
  import jax._src.xla_bridge as xla_bridge
  assert not xla_bridge._backends and threading.active_count() == 1
  # The process's own threads: numpy's OpenBLAS pool at most, which prepares for a fork.
  tasks = '/proc/self/task'
  assert not os.path.isdir(tasks) or len(os.listdir(tasks)) <= 2
  parent = os.getppid()
  listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
  listener.bind(address + '.binding')
  listener.listen(64)
  listener.settimeout(1.0)
  os.rename(address + '.binding', address)
  sys.stdout.flush()
  sys.stderr.flush()
  while os.getppid() == parent:  # The test worker that started it is gone: stop.
    while True:  # Helpers that have reported.
      try:
        if os.waitpid(-1, os.WNOHANG)[0] == 0:
          break
      except ChildProcessError:
        break
    try:
      connection, _ = listener.accept()
    except TimeoutError:
      continue
    connection.settimeout(None)
    if os.fork() == 0:
      listener.close()
      _handle(connection)
    connection.close()


if __name__ == '__main__':
  serve(sys.argv[1])
