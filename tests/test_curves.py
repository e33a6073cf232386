"""--mode=plot's reading of metrics.jsonl (a resumed run's repeated steps, a line a killed
run cut short) and its PNG; eval_results.json kept whole when evaluations end together."""
import json
import threading

import numpy as np
import pytest
from matplotlib import image

from lmlab.training import curves, eval_results
from lmlab.training.workdir import WorkdirError


def write_run(folder, lines, tail=''):
  folder.mkdir()
  (folder / 'metrics.jsonl').write_text(''.join(json.dumps(m) + '\n' for m in lines) + tail)


def test_curves_of_runs_into_one_png(tmp_path, rng, capsys):
  steps = sorted(rng.choice(np.arange(1, 200), 12, replace=False).tolist())
  losses = {s: float(v) for s, v in zip(steps, rng.uniform(1, 5, len(steps)))}
  evals = {s: float(v) for s, v in zip(steps[::4], rng.uniform(1, 5, 3))}
  lines = [{'step': 0, 'params': 123, 'trainable_params': 123}]
  lines += [{'step': s, 'loss': 9.0, 'lr': 0.1} for s in steps[:3]]  # Resumed: logged again.
  lines += [{'step': s, 'loss': v, 'lr': 0.1, 'tokens_per_sec': 5.0} for s, v in losses.items()]
  lines += [{'step': s, 'eval_loss': v, 'eval/bpb/bits_per_byte': v / 2} for s, v in evals.items()]
  write_run(tmp_path / 'a', lines, tail='{"step": 300, "lo')
  write_run(tmp_path / 'b', [{'step': 5, 'loss': 1.0}, {'step': 6, 'eval_loss': 2.0}])
  assert curves.curves(str(tmp_path / 'a')) == {
      'loss': losses, 'eval_loss': evals,
      'eval/bpb/bits_per_byte': {s: v / 2 for s, v in evals.items()}}
  assert f'line {len(lines) + 1}, is not a metrics line' in capsys.readouterr().err
  out = str(tmp_path / 'both.png')
  curves.plot([str(tmp_path / 'a'), str(tmp_path / 'b')], out)
  height, width, channels = image.imread(out).shape
  assert channels in (3, 4) and width > height > 100


def test_plot_refuses_what_it_cannot_draw(tmp_path):
  write_run(tmp_path / 'a', [{'step': 1, 'loss': 1.0}])
  (tmp_path / 'kept.jpg').write_bytes(b'mine')
  for workdirs, out, message in [([tmp_path / 'a'], tmp_path / 'kept.jpg', 'name a .png'),
                                 ([tmp_path / 'none'], tmp_path / 'x.png', 'has no metrics.jsonl')]:
    with pytest.raises(WorkdirError, match=message):
      curves.plot([str(w) for w in workdirs], str(out))
  assert (tmp_path / 'kept.jpg').read_bytes() == b'mine'


def test_evaluations_ending_together_keep_every_result(tmp_path):
  threads = [threading.Thread(target=eval_results.append,
                              args=(str(tmp_path), f'task{i}', {'acc': i / 16}),
                              kwargs={'step': 1, 'settings': {}}) for i in range(16)]
  for thread in threads:
    thread.start()
  for thread in threads:
    thread.join()
  with open(eval_results.results_path(str(tmp_path))) as f:
    assert sorted(entry['task'] for entry in json.load(f)) == sorted(f'task{i}' for i in range(16))
