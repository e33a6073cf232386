"""main.py end to end, in subprocesses: train, resume exactly, evaluate, generate, bad input,
one run per workdir, failed saves and corrupted checkpoints."""
import concurrent.futures
import datetime
import hashlib
import json
import os
import platform
import signal
import socket
import subprocess
import sys
import time

from pathlib import Path

import pytest

import main_server
from conftest import ROOT

SMALL = ['--set', 'd_model=32', '--set', 'n_layers=1', '--set', 'n_heads=2',
         '--set', 'n_kv_heads=1', '--set', 'ffn_dim=64', '--batch_size=4', '--seq_len=16',
         '--eval_batches=2', '--max_new_tokens=8', '--warmup_steps=2']


def run_main(*args, check=True, prefix=(), cwd=ROOT):
  """main.py with `args` (after the command words of `prefix`, such as a ulimit), run in
  `cwd`: forked from a process that has imported it already (main_server.py) unless a
  prefix needs a process of its own."""
  argv = [os.path.join(ROOT, 'main.py'), *args]
  if prefix:
    result = subprocess.run([*prefix, sys.executable, *argv], capture_output=True, cwd=cwd,
                            timeout=300)
  else:
    result = main_server.run(argv, cwd=str(cwd), timeout=300)
  # Decoded here rather than with text=True, which would turn a generated '\r' into '\n'.
  result.stdout, result.stderr = result.stdout.decode(), result.stderr.decode()
  if check and result.returncode != 0:
    raise AssertionError(f'main.py failed ({result.returncode}):\n{result.stderr[-3000:]}')
  return result


def run_mains(*commands, check=True, cwd=ROOT):
  """run_main of each argument list, the runs side by side: a run mostly keeps one core
  busy (importing JAX, compiling), so on two cores independent runs take about half as long
  together as in turn."""
  with concurrent.futures.ThreadPoolExecutor(len(commands)) as pool:
    return list(pool.map(lambda args: run_main(*args, check=check, cwd=cwd), commands))


def metrics(workdir):
  with open(os.path.join(workdir, 'metrics.jsonl')) as f:
    return [json.loads(line) for line in f]


def train_losses(workdir):
  return {m['step']: m['loss'] for m in metrics(workdir) if 'loss' in m}


def test_train_eval_generate(tmp_path, corpus_dir, rng):
  workdir = str(tmp_path / 'run')
  questions = tmp_path / 'questions.jsonl'
  questions.write_text(''.join(json.dumps(
      {'context': 'alpha beta', 'choices': list(rng.choice(['gamma', 'def', ')'], 2)),
       'label': int(rng.integers(2))}) + '\n' for _ in range(5)))
  out = run_main(*SMALL, f'--data={corpus_dir}', f'--workdir={workdir}', '--steps=30',
                 '--eval_every=10', '--log_every=5', '--learning_rate=1e-2',
                 f'--eval_tasks=bpb,mc:{questions}').stdout
  assert 'validation loss' in out and 'sample:' in out
  lines = metrics(workdir)
  train_lines = [m for m in lines if 'loss' in m]
  eval_lines = [m for m in lines if 'eval_loss' in m]
  assert {'step', 'loss', 'lr', 'grad_norm', 'tokens_per_sec'} <= set(train_lines[-1])
  assert {'step', 'eval_loss', 'eval_ppl', 'eval/bpb/bits_per_byte', 'eval/mc_questions/acc',
          'eval/mc_questions/acc_norm'} <= set(eval_lines[-1])
  assert eval_lines[0]['step'] == 0 and eval_lines[-1]['step'] == 30
  assert eval_lines[-1]['eval_loss'] < eval_lines[0]['eval_loss'] - 1.0
  assert eval_lines[-1]['eval/bpb/bits_per_byte'] < eval_lines[0]['eval/bpb/bits_per_byte']
  check_tensorboard(workdir, lines)
  with open(os.path.join(workdir, 'config.json')) as f:
    recorded = json.load(f)
  assert recorded['model']['d_model'] == 32
  check_environment(recorded['environment'], [*SMALL, f'--data={corpus_dir}'])

  other, png = tmp_path / 'other', tmp_path / 'curves.png'
  other.mkdir()
  (other / 'metrics.jsonl').write_text(json.dumps({'step': 3, 'loss': 2.0}) + '\n')
  written = files_of(workdir)
  evaluated, on_file, sample, _, tasks, plotted = (result.stdout for result in run_mains(
      ['--mode=eval', f'--workdir={workdir}'],
      ['--mode=eval', f'--workdir={workdir}', f'--data={corpus_dir / "doc0.txt"}'],
      ['--mode=generate', f'--workdir={workdir}', '--prompt=alpha', '--temperature=0',
       '--max_new_tokens=12'],
      ['--mode=convert', f'--workdir={workdir}', f'--hf_out={tmp_path / "exported"}'],
      ['--mode=eval', f'--workdir={workdir}', f'--tasks=bpb,lambada_style,mc:{questions}'],
      ['--mode=plot', f'--workdir={workdir},{other}', f'--plot_out={png}']))
  assert plotted.startswith(f'wrote {png}') and png.read_bytes().startswith(b'\x89PNG')
  reported = float(evaluated.split('loss ')[1].split(',')[0])
  assert abs(reported - eval_lines[-1]['eval_loss']) < 1e-3
  assert 'on --data' in on_file
  assert sample.startswith('alpha')
  # They read the workdir; evaluations add their results, and nothing else is written there.
  results_file = os.path.join(workdir, 'eval_results.json')
  untouched = lambda files: {path: stat for path, stat in files.items()
                             if path not in (workdir, results_file)}
  assert untouched(files_of(workdir)) == untouched(written)
  assert results_file in files_of(workdir) and results_file not in written
  with open(results_file) as f:
    results = json.load(f)
  # The tasks measure the final checkpoint as the training's last evaluation did.
  by_task = {entry['task']: entry['metrics'] for entry in results}
  assert set(by_task) == {'lm', 'bpb', 'lambada_style', 'mc_questions'}
  assert {entry['settings']['tasks'] for entry in results if entry['task'] != 'lm'} == {
      f'bpb,lambada_style,mc:{questions}'}
  for task in ('bpb', 'mc_questions'):
    for metric, value in by_task[task].items():
      assert value == pytest.approx(eval_lines[-1][f'eval/{task}/{metric}'], rel=1e-5)
      assert f'{metric} {value:.4f}' in tasks
  assert 0 <= by_task['lambada_style']['acc'] <= 1
  results = sorted((e for e in results if e['task'] == 'lm'),
                   key=lambda entry: entry['settings']['data'])
  assert [entry['settings']['data'] for entry in results] == [
      str(corpus_dir / 'doc0.txt'), 'the validation split']
  for entry, printed in zip(results, (on_file, evaluated)):
    assert entry['task'] == 'lm' and entry['step'] == 30
    assert f'loss {entry["metrics"]["loss"]:.4f}' in printed
    assert entry['settings']['eval_batches'] == 2 and entry['settings']['seq_len'] == 16
    check_environment(entry['environment'], ['--mode=eval', f'--workdir={workdir}'])
  # A results file that is not a list is kept as it is, and the evaluation fails saying so.
  with open(results_file, 'w') as f:
    f.write('{"mine": 1}')
  refused = run_main('--mode=eval', f'--workdir={workdir}', check=False)
  assert refused.returncode == 1 and 'is not a list of results' in refused.stderr
  with open(results_file) as f:
    assert f.read() == '{"mine": 1}'


def check_tensorboard(workdir, lines):
  """The events files hold metrics.jsonl's numbers, read as `tensorboard --logdir` reads
  them."""
  from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
  events = EventAccumulator(workdir, size_guidance={'scalars': 0}).Reload()
  for tag, key in [('train/loss', 'loss'), ('eval/loss', 'eval_loss'),
                   ('eval/bpb/bits_per_byte', 'eval/bpb/bits_per_byte')]:
    logged = {m['step']: m[key] for m in lines if key in m}
    shown = {e.step: e.value for e in events.Scalars(tag)}
    assert shown.keys() == logged.keys()
    assert all(shown[step] == pytest.approx(logged[step], rel=1e-6) for step in logged)


def check_environment(environment, flags):
  """config.json's record of the run against this process's own view of the same machine."""
  jax = pytest.importorskip('jax')
  assert environment['packages']['jax'] == jax.__version__
  assert environment['python'] == platform.python_version()
  assert environment['devices']['count'] == jax.device_count()
  assert environment['devices']['platform'] == jax.devices()[0].platform
  assert environment['command'][0] == 'main.py' and set(flags) <= set(environment['command'])
  head = subprocess.run(['git', '-C', ROOT, 'rev-parse', 'HEAD'], capture_output=True,
                        text=True, check=False)
  if head.returncode == 0:  # A git checkout: its commit, marked when files differ.
    assert environment['commit'].split('+')[0] == head.stdout.strip()
  recorded = datetime.datetime.fromisoformat(environment['time'])
  assert abs((datetime.datetime.now(datetime.timezone.utc) - recorded).total_seconds()) < 600


def files_of(folder):
  """{path: (size, mtime)} of everything under folder, folders included."""
  return {path: (os.stat(path).st_size, os.stat(path).st_mtime_ns)
          for path in [str(folder)] + [str(p) for p in sorted(Path(folder).rglob('*'))]}


def test_trained_tokenizers(tmp_path, corpus_dir):
  workdir, vocab = tmp_path / 'run', tmp_path / 'out.tiktoken'
  out, written = (result.stdout for result in run_mains(
      [*SMALL, f'--data={corpus_dir}', f'--workdir={workdir}', '--steps=3',
       '--tokenizer=bpe:300:cl100k:digits', '--prompt=alpha'],
      ['--mode=tokenizer', '--tokenizer=bpe:280', f'--data={corpus_dir}',
       f'--tokenizer_out={vocab}']))
  assert 'sample:\nalpha' in out
  assert (workdir / 'tokenizer' / 'bpe-300-cl100k-digits.tiktoken').exists()
  with open(workdir / 'config.json') as f:
    assert json.load(f)['model']['vocab_size'] == 320  # 300 tokens, rounded up to 64s.

  assert 'wrote' in written
  before = vocab.read_bytes()
  exists, trained, wrong_sha = run_mains(
      ['--mode=tokenizer', '--tokenizer=bpe:290', f'--data={corpus_dir}',
       f'--tokenizer_out={vocab}'],
      [*SMALL, f'--data={corpus_dir}', f'--workdir={tmp_path / "run2"}', '--steps=2',
       f'--tokenizer={vocab}', f'--tokenizer_sha256={hashlib.sha256(before).hexdigest()}'],
      [*SMALL, f'--data={corpus_dir}', f'--workdir={tmp_path / "run4"}', '--steps=2',
       f'--tokenizer={vocab}', f'--tokenizer_sha256={"0" * 64}'], check=False)
  assert_one_error_line(exists, 'already exists')
  assert vocab.read_bytes() == before
  assert trained.returncode == 0, trained.stderr[-3000:]
  assert_one_error_line(wrong_sha, 'sha256')
  vocab.write_text('not base64 at all\n')
  expect_error(*SMALL, f'--data={corpus_dir}', f'--workdir={tmp_path / "run3"}', '--steps=2',
               f'--tokenizer={vocab}', match='line 1')


def test_sigterm_saves_and_the_run_resumes(tmp_path, corpus_dir):
  workdir = str(tmp_path / 'run')
  args = [sys.executable, os.path.join(ROOT, 'main.py'), *SMALL, f'--data={corpus_dir}',
          f'--workdir={workdir}', '--steps=100000', '--log_every=1', '--save_every=100000',
          '--wandb=offline']
  process = subprocess.Popen(args, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
  deadline = time.time() + 120
  while time.time() < deadline and not any('loss' in m for m in _safe_metrics(workdir)):
    time.sleep(0.2)
  process.send_signal(signal.SIGTERM)
  _, stderr = process.communicate(timeout=120)
  assert process.returncode == 128 + signal.SIGTERM, stderr.decode()[-2000:]
  assert 'checkpoint saved' in stderr.decode()
  stopped_at = max(train_losses(workdir))
  assert os.path.isdir(os.path.join(workdir, 'checkpoints', str(stopped_at)))
  out = run_main(*SMALL, f'--data={corpus_dir}', f'--workdir={workdir}',
                 f'--steps={stopped_at + 2}', '--schedule_steps=100000', '--wandb=offline').stdout
  assert f'resumed from checkpoint {stopped_at}' in out
  check_wandb(workdir, metrics(workdir))


def check_wandb(workdir, lines):
  """The offline W&B runs of a stopped and resumed training run, read back with W&B's own
  record schema: one run id for both, metrics.jsonl's numbers as its history and config.json
  as its config."""
  runs = sorted(Path(workdir, 'wandb').glob('offline-run-*/run-*.wandb'))
  assert len(runs) == 2 and len({path.name for path in runs}) == 1
  history, configs = {}, []
  for record in (record for path in runs for record in wandb_records(path)):
    kind = record.WhichOneof('record_type')
    if kind == 'history':
      row = {item.key or '/'.join(item.nested_key): json.loads(item.value_json)
             for item in record.history.item}
      for tag, value in row.items():
        history.setdefault(tag, {})[row['step']] = value
    elif kind == 'run':
      configs.append({item.key or '/'.join(item.nested_key): json.loads(item.value_json)
                      for item in record.run.config.update})
  with open(os.path.join(workdir, 'config.json')) as f:
    recorded = json.load(f)
  assert configs and all(config['model'] == recorded['model'] for config in configs)
  for tag, key in [('train/loss', 'loss'), ('eval/loss', 'eval_loss'), ('train/lr', 'lr')]:
    logged = {m['step']: m[key] for m in lines if key in m}
    assert history[tag] == pytest.approx(logged, rel=1e-6)


def wandb_records(path):
  """The protobuf records of a .wandb file: a 7-byte file header, then LevelDB's log format
  (32 KiB blocks of records, each with a 7-byte header: CRC, length, and whether it is a
  whole record or its first, middle or last piece)."""
  from wandb.proto import wandb_internal_pb2
  data = Path(path).read_bytes()
  assert data[:4] == b':W&B'
  block, position, pieces = 32768, 7, []
  while position + 7 <= len(data):
    if block - position % block < 7:  # A block's tail too short for a header is zeros.
      position += block - position % block
      continue
    length, kind = int.from_bytes(data[position + 4:position + 6], 'little'), data[position + 6]
    pieces.append(data[position + 7:position + 7 + length])
    position += 7 + length
    if kind in (1, 4):
      record = wandb_internal_pb2.Record()
      record.ParseFromString(b''.join(pieces))
      pieces = []
      yield record


def _safe_metrics(workdir):
  try:
    return metrics(workdir)
  except (FileNotFoundError, json.JSONDecodeError):
    return []


def expect_error(*args, match):
  assert_one_error_line(run_main(*args, check=False), match)


def assert_one_error_line(result, match):
  """The run failed with one line 'error: ...' that contains `match`, and no traceback."""
  assert result.returncode != 0
  error_lines = [l for l in result.stderr.splitlines() if l.startswith('error:')]
  assert len(error_lines) == 1 and match in error_lines[0], result.stderr[-2000:]
  assert 'Traceback' not in result.stderr


BAD_FLAGS = [
    (['--model=gpt9'], 'unknown model preset'),
    (['--set', 'no_such_field=1'], 'unknown config field'),
    (['--set', 'n_heads=4', '--set', 'n_kv_heads=3'], 'not divisible by n_kv_heads'),
    (['--set', 'norm=batchnorm'], 'norm='),
    (['--data=/no/such/path'], 'no such file'),
    (['--set', 'position=learned', '--set', 'max_seq_len=8'], 'learned position table'),
]


def test_bad_flags(tmp_path):
  """Each bad flag stops its run with one error line (the runs side by side)."""
  results = run_mains(*[[f'--workdir={tmp_path / str(i)}', '--steps=1', *args]
                        for i, (args, _) in enumerate(BAD_FLAGS)], check=False)
  for (_, match), result in zip(BAD_FLAGS, results):
    assert_one_error_line(result, match)


def test_empty_data_dir(tmp_path):
  (tmp_path / 'empty').mkdir()
  (tmp_path / 'empty' / 'blank.txt').write_text('')
  expect_error(f'--data={tmp_path / "empty"}', f'--workdir={tmp_path / "run"}',
               match='no non-empty files')


def test_workdir_errors_keep_everything_on_disk(tmp_path, corpus_dir):
  workdir = tmp_path / 'run'
  base = [*SMALL, f'--data={corpus_dir}', f'--workdir={workdir}']
  run_main(*base, '--steps=4', '--save_every=2')

  def snapshot():
    return {str(p.relative_to(workdir)): p.read_bytes() for p in workdir.rglob('*')
            if p.is_file()}

  before = snapshot()
  different, nothing = run_mains([*base, '--steps=6', '--set', 'n_layers=2'],
                                 ['--mode=eval', f'--workdir={tmp_path / "nothing"}'],
                                 check=False)
  assert_one_error_line(different, 'different config')
  assert_one_error_line(nothing, 'config.json')
  expect_error(*base, '--steps=6', '--learning_rate=1e30', match='non-finite')
  assert snapshot().keys() >= before.keys()
  assert all(snapshot()[k] == v for k, v in before.items() if 'metrics' not in k)

  # Corrupt every checkpoint's arrays: resuming or evaluating names the latest and stops.
  for path in (workdir / 'checkpoints').glob('*/state/**/*'):
    if path.is_file() and path.stat().st_size > 0:
      path.write_bytes(b'garbage')
  for result in run_mains([*base, '--steps=6'], ['--mode=eval', f'--workdir={workdir}'],
                          check=False):
    assert_one_error_line(result, 'checkpoint 4')
  assert sorted(os.listdir(workdir / 'checkpoints')) == ['2', '4']


def wait_for_step(workdir, process, step):
  deadline = time.time() + 120
  while max((m['step'] for m in _safe_metrics(workdir) if 'loss' in m), default=0) < step:
    assert process.poll() is None and time.time() < deadline, 'the first run did not train'
    time.sleep(0.2)


def test_one_run_per_workdir(tmp_path, corpus_dir):
  workdir = str(tmp_path / 'run')
  common = [*SMALL, f'--data={corpus_dir}', f'--workdir={workdir}', '--log_every=1',
            '--save_every=3', '--schedule_steps=100000']
  first = subprocess.Popen([sys.executable, os.path.join(ROOT, 'main.py'), *common,
                            '--steps=100000'], cwd=ROOT, stdout=subprocess.DEVNULL,
                           stderr=subprocess.DEVNULL)
  try:
    wait_for_step(workdir, first, 4)  # Checkpoint 3 is complete.
    expect_error(*common, '--steps=100000',
                 match=f'in use by process {first.pid} on {socket.gethostname()}')
  finally:
    first.send_signal(signal.SIGKILL)
    first.wait()
  latest = max(int(name) for name in os.listdir(os.path.join(workdir, 'checkpoints'))
               if name.isdigit())
  out = run_main(*common, f'--steps={latest + 2}').stdout
  assert f'took over {os.path.join(workdir, "lock")} from process {first.pid}' in out
  assert f'resumed from checkpoint {latest} in' in out
  assert not os.path.exists(os.path.join(workdir, 'lock'))


# Runs a command whose files may not grow past 64 KiB, so saving a checkpoint's arrays fails
# (write() returns EFBIG: Python ignores SIGXFSZ). A shell sets the limit rather than a
# preexec_fn, which would fork this multithreaded process.
LIMIT_FILE_SIZE = ('bash', '-c', 'ulimit -f 64 && exec "$@"', 'bash')


def test_failed_saves_and_corrupted_checkpoints_lose_nothing(tmp_path, corpus_dir):
  """A run stopped at step 6 resumes to step 9 with the uninterrupted run's losses, bit for
  bit (dropout on), after a corrupted checkpoint, a failed save, and again after going back
  with --resume_step."""
  common = [*SMALL, f'--data={corpus_dir}', '--log_every=1', '--save_every=3',
            '--schedule_steps=9', '--set', 'dropout_rate=0.1']
  straight, workdir = str(tmp_path / 'straight'), tmp_path / 'run'
  run_mains([*common, f'--workdir={straight}', '--steps=9'],
            [*common, f'--workdir={workdir}', '--steps=6'])
  expected = train_losses(straight)
  checkpoints = workdir / 'checkpoints'

  # Truncate the largest file of checkpoint 6's arrays: evaluating names it and moves nothing.
  largest = max((p for p in (checkpoints / '6' / 'state').rglob('*') if p.is_file()),
                key=lambda p: p.stat().st_size)
  os.truncate(largest, largest.stat().st_size // 2)
  expect_error('--mode=eval', f'--workdir={workdir}', match='checkpoint 6 in')
  assert sorted(os.listdir(checkpoints)) == ['3', '6']

  # Training falls back to checkpoint 3 with a warning, then saving checkpoint 6 fails.
  failed = run_main(*common, f'--workdir={workdir}', '--steps=9', check=False,
                    prefix=LIMIT_FILE_SIZE)
  assert failed.returncode == 1
  [error] = [line for line in failed.stderr.splitlines() if line.startswith('error:')]
  assert f'saving checkpoint 6 in {checkpoints} failed' in error, failed.stderr[-2000:]
  assert 'checkpoint 3 is kept' in error and 'Traceback' not in failed.stderr
  [warning] = [line for line in failed.stdout.splitlines() if line.startswith('warning:')]
  assert f'checkpoint 6 in {checkpoints} cannot be read' in warning
  assert f'moved to {checkpoints / "6.unreadable"}, resuming from checkpoint 3' in warning
  assert 'resumed from checkpoint 3' in failed.stdout
  left = sorted(os.listdir(checkpoints))
  assert [name for name in left if name.isdigit()] == ['3'] and len(left) == 3  # And a tmp.
  # The half-written step is not a step to read, and evaluating leaves it where it is.
  assert run_main('--mode=eval', f'--workdir={workdir}').stdout.startswith('checkpoint 3:')
  assert sorted(os.listdir(checkpoints)) == left

  # The next run resumes from checkpoint 3, removes the half-written step and computes the
  # uninterrupted run's losses.
  out = run_main(*common, f'--workdir={workdir}', '--steps=9').stdout
  assert 'resumed from checkpoint 3' in out
  assert sorted(os.listdir(checkpoints)) == ['3', '6', '6.unreadable', '9']
  assert {s: train_losses(workdir)[s] for s in range(4, 10)} == {
      s: expected[s] for s in range(4, 10)}

  # --resume_step goes back to an older checkpoint, moving the newer ones aside.
  out = run_main(*common, f'--workdir={workdir}', '--steps=9', '--resume_step=3').stdout
  assert f'checkpoint 9 moved to {checkpoints / "9.superseded"}' in out
  assert sorted(os.listdir(checkpoints)) == ['3', '6', '6.superseded', '6.unreadable', '9',
                                             '9.superseded']
  assert {s: train_losses(workdir)[s] for s in range(4, 10)} == {
      s: expected[s] for s in range(4, 10)}
