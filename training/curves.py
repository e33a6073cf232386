"""`--mode=plot`: the curves of several runs, read from their metrics.jsonl, in one PNG: the
training loss, and each evaluation metric any of them logged (the validation loss,
eval/<task>/<metric> of --eval_tasks), a panel each, one line per run.

  python main.py --mode=plot --workdir=runs/a,runs/b --plot_out=a_vs_b.png
"""
import math
import os

from lmlab.training import metrics as metrics_log
from lmlab.training.workdir import WorkdirError

# Logged numbers that describe the run rather than follow its training.
NOT_CURVES = ('step', 'lr', 'tokens_per_sec', 'mfu', 'grad_norm')


def curves(workdir: str) -> dict[str, dict[int, float]]:
  """{metric: {step: value}} of a run; a step logged twice (a resumed run) keeps its last."""
  if not os.path.isfile(os.path.join(workdir, 'metrics.jsonl')):
    raise WorkdirError(f'{workdir} has no metrics.jsonl; --mode=plot reads training runs\' '
                       'workdirs')
  found = {}
  for entry in metrics_log.read(workdir):
    if 'loss' not in entry and not any(k.startswith('eval') for k in entry):
      continue  # The run's sizes, logged once.
    for key, value in entry.items():
      if key not in NOT_CURVES and isinstance(value, (int, float)) and math.isfinite(value):
        found.setdefault(key, {})[entry['step']] = value
  return found


def plot(workdirs: list[str], out: str):
  """Draws the runs' curves into the PNG `out`."""
  if not out.endswith('.png'):
    raise WorkdirError(f'--plot_out={out!r}: the plot is a PNG; name a .png file')
  runs = {workdir: curves(workdir) for workdir in workdirs}
  names = sorted({name for run in runs.values() for name in run},
                 key=lambda name: (name != 'loss', metrics_log.tensorboard_tag(name)))
  if not names:
    raise WorkdirError(f'{", ".join(workdirs)}: no metrics logged yet')
  import matplotlib
  matplotlib.use('Agg')
  from matplotlib import pyplot as plt
  columns = min(3, len(names))
  rows = -(-len(names) // columns)
  figure, axes = plt.subplots(rows, columns, figsize=(5 * columns, 3.6 * rows), squeeze=False)
  for ax, name in zip(axes.flat, names):
    for workdir, run in runs.items():
      if name in run:
        steps = sorted(run[name])
        ax.plot(steps, [run[name][s] for s in steps], marker='.' if len(steps) < 30 else None,
                label=os.path.basename(os.path.normpath(workdir)))
    ax.set_title(metrics_log.tensorboard_tag(name))
    ax.set_xlabel('step')
    ax.grid(alpha=0.3)
    ax.legend(fontsize='small')
  for ax in list(axes.flat)[len(names):]:
    ax.set_visible(False)
  figure.tight_layout()
  figure.savefig(out + '.partial.png', dpi=100)
  plt.close(figure)
  os.replace(out + '.partial.png', out)
