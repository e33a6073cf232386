"""What an experiment leaves in --out: results.csv (one row per run), results.md (the table
a person reads, mean ± std over seeds per cell) and PNG plots (matplotlib, Agg backend)."""
import csv
import dataclasses
import math
import os
import statistics

import matplotlib

matplotlib.use('Agg')
import matplotlib.pyplot as plt  # noqa: E402
import matplotlib.ticker  # noqa: E402


@dataclasses.dataclass(frozen=True)
class Column:
  """A table column: the mean ± std over seeds of record[key] (a k/n count for booleans)."""
  key: str
  header: str
  digits: int = 3


def _present(value) -> bool:
  return value is not None and not (isinstance(value, float) and math.isnan(value))


def mean_std(values) -> tuple[float, float]:
  """(mean, sample std) of the values present; (nan, 0) when none is, std 0 for one."""
  present = [float(v) for v in values if _present(v)]
  if not present:
    return math.nan, 0.0
  return statistics.mean(present), statistics.stdev(present) if len(present) > 1 else 0.0


def summarise(values, digits: int) -> str:
  """'mean ± std' of the values present (std only when they differ), 'k/n' for booleans,
  with '(k of n)' when some runs have no value, '—' when none has."""
  if values and all(isinstance(v, bool) for v in values):
    return f'{sum(values)}/{len(values)}'
  present = [float(v) for v in values if _present(v)]
  if not present:
    return '—'
  text = f'{statistics.mean(present):.{digits}f}'
  if len(set(present)) > 1:
    text += f' ± {statistics.stdev(present):.{digits}f}'
  if len(present) < len(values):
    text += f' ({len(present)} of {len(values)})'
  return text


def group(rows: list[dict], axes: list[str]) -> dict[tuple, list[dict]]:
  """Rows by their values on `axes`, in first-seen order."""
  groups = {}
  for row in rows:
    groups.setdefault(tuple(row[a] for a in axes), []).append(row)
  return groups


def markdown_table(rows: list[dict], axes: list[str], columns: list[Column]) -> str:
  lines = ['| ' + ' | '.join(axes + ['runs'] + [c.header for c in columns]) + ' |',
           '|' + '---|' * (len(axes) + 1 + len(columns))]
  for values, members in group(rows, axes).items():
    cells = [str(v) for v in values] + [str(len(members))]
    cells += [summarise([m.get(c.key) for m in members], c.digits) for c in columns]
    lines.append('| ' + ' | '.join(cells) + ' |')
  return '\n'.join(lines)


def write_csv(path: str, rows: list[dict]):
  """One line per row; the columns are every scalar field (lists stay in result.json)."""
  names = []
  for row in rows:
    names += [k for k, v in row.items() if not isinstance(v, (list, dict)) and k not in names]
  with open(path, 'w', newline='') as f:
    writer = csv.DictWriter(f, fieldnames=names, extrasaction='ignore')
    writer.writeheader()
    writer.writerows(rows)


def write(settings, rows: list[dict], *, title: str, intro: str, axes: list[str],
          columns: list[Column], plots: list[tuple[str, str]], notes: str = ''):
  """results.csv and results.md in settings.out; `plots` are (file name, caption) of PNGs
  already written there."""
  os.makedirs(settings.out, exist_ok=True)
  write_csv(os.path.join(settings.out, 'results.csv'), rows)
  parts = [f'# {title}', intro, f'`{settings.command()}`', settings.describe(),
           markdown_table(rows, axes, columns),
           'Mean ± standard deviation over seeds; k/n counts runs; "(k of n)": only k runs '
           'have a value.' + (f' {notes}' if notes else '')]
  parts += [f'![{caption}]({name})' for name, caption in plots]
  with open(os.path.join(settings.out, 'results.md'), 'w') as f:
    f.write('\n\n'.join(p for p in parts if p) + '\n')
  print(f'wrote {os.path.join(settings.out, "results.md")}, results.csv and '
        f'{len(plots)} plots')


def _smooth(values, window: int):
  return [statistics.mean(values[max(0, i - window + 1):i + 1]) for i in range(len(values))]


def mean_curve(records: list[dict], steps_key: str, values_key: str):
  """(steps, mean, std) over records of a logged curve; a step counts the runs that have it."""
  by_step = {}
  for record in records:
    for step, value in zip(record[steps_key], record[values_key]):
      if _present(value) and math.isfinite(value):
        by_step.setdefault(step, []).append(value)
  steps = sorted(by_step)
  means, stds = zip(*(mean_std(by_step[s]) for s in steps)) if steps else ((), ())
  return steps, list(means), list(stds)


def line_plot(path: str, panels: dict[str, dict[str, tuple]], *, xlabel: str, ylabel: str,
              title: str, logx: bool = False, logy: bool = False, markers: bool = False,
              ylim=None):
  """One subplot per panel, one line per series: (xs, means, stds), with a ±std band, or
  error bars when `markers` marks the measured points."""
  n = len(panels)
  cols = 2 if n == 4 else min(n, 3)
  rows = math.ceil(n / cols)
  fig, axes = plt.subplots(rows, cols, figsize=(5.2 * cols, 3.8 * rows), squeeze=False)
  for ax, (panel, series) in zip(axes.flat, panels.items()):
    for label, (xs, means, stds) in series.items():
      if markers:
        ax.errorbar(xs, means, yerr=stds, label=label, marker='o', markersize=3, capsize=3)
        continue
      line, = ax.plot(xs, means, label=label)
      low = [m - s for m, s in zip(means, stds)]
      high = [m + s for m, s in zip(means, stds)]
      ax.fill_between(xs, low, high, color=line.get_color(), alpha=0.15, linewidth=0)
    ax.set_title(panel, fontsize=9)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    if logx:  # ticks at the measured values, as plain numbers
      ax.set_xscale('log', base=2)
      xs = sorted({x for xs, _, _ in series.values() for x in xs})
      ax.set_xticks(xs, [f'{x:g}' for x in xs], rotation=30)
      ax.xaxis.set_minor_locator(matplotlib.ticker.NullLocator())
    if logy:
      ax.set_yscale('log')
      plain = matplotlib.ticker.FuncFormatter(lambda y, _: f'{y:g}')
      ax.yaxis.set_major_formatter(plain)
      ax.yaxis.set_minor_formatter(plain if ax.get_ylim()[1] < 10 * ax.get_ylim()[0]
                                   else matplotlib.ticker.NullFormatter())
    if ylim is not None:
      ax.set_ylim(*ylim)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
  for ax in list(axes.flat)[n:]:
    ax.axis('off')
  fig.suptitle(title, fontsize=11)
  fig.tight_layout()
  fig.savefig(path, dpi=90)
  plt.close(fig)


def loss_curves(settings, records: list[dict], *, line_axes: list[str],
                panel_axes: list[str] = (), smooth: int = 5, file: str = 'loss_curves.png'):
  """Training loss against step, averaged over seeds (moving average of `smooth` logged
  values), one line per value of line_axes and one panel per value of panel_axes."""
  panels, shown_values = {}, []
  for panel_values, panel_records in group(records, list(panel_axes)).items():
    panel = ', '.join(f'{a}={v}' for a, v in zip(panel_axes, panel_values)) or 'all runs'
    series = {}
    for line_values, members in group(panel_records, line_axes).items():
      steps, means, stds = mean_curve(members, 'train_steps', 'train_losses')
      means = _smooth(means, smooth)
      series['/'.join(map(str, line_values))] = (steps, means, _smooth(stds, smooth))
      # The first tenth of training (the drop from ln(vocab)) would flatten the rest.
      shown_values += [m for s, m in zip(steps, means) if s >= steps[-1] / 10]
    panels[panel] = series
  margin = 0.05 * (max(shown_values) - min(shown_values)) if shown_values else 0.0
  line_plot(os.path.join(settings.out, file), panels, xlabel='step',
            ylabel=f'training loss (mean of {smooth} logs)', title='Training loss',
            ylim=(min(shown_values) - margin, max(shown_values) + margin) if margin else None)
  return file, 'training loss curves'


def bar_plot(path: str, labels: list[str], means: list[float], stds: list[float], *,
             ylabel: str, title: str):
  fig, ax = plt.subplots(figsize=(max(4.0, 0.7 * len(labels) + 2), 3.8))
  ax.bar(range(len(labels)), means, yerr=stds, capsize=3, color='tab:blue', alpha=0.8)
  ax.set_xticks(range(len(labels)), labels, rotation=30, ha='right', fontsize=8)
  ax.set_ylabel(ylabel)
  ax.set_title(title, fontsize=11)
  ax.grid(axis='y', alpha=0.3)
  finite = [m for m in means if math.isfinite(m)]
  if finite:
    low, high = min(finite), max(finite)
    ax.set_ylim(max(0.0, low - 0.5 * (high - low + 0.1)), high + 0.5 * (high - low + 0.1))
  fig.tight_layout()
  fig.savefig(path, dpi=90)
  plt.close(fig)


def bar_plot_of(settings, records: list[dict], axes: list[str], key: str, *, ylabel: str,
                title: str, file: str):
  """A bar per cell of record[key], mean ± std over seeds (runs without a value left out)."""
  labels, means, stds = [], [], []
  for values, members in group(records, axes).items():
    mean, std = mean_std(m.get(key) for m in members)
    labels.append('/'.join(map(str, values)))
    means.append(mean)
    stds.append(std)
  bar_plot(os.path.join(settings.out, file), labels, means, stds, ylabel=ylabel, title=title)
  return file, title


def scatter_plot(settings, records: list[dict], axes: list[str], x_key: str, y_key: str, *,
                 xlabel: str, ylabel: str, title: str, file: str):
  """A point per run of (record[x_key], record[y_key]), a colour per cell."""
  fig, ax = plt.subplots(figsize=(5.5, 4.0))
  for values, members in group(records, axes).items():
    points = [(m[x_key], m[y_key]) for m in members
              if _present(m.get(x_key)) and _present(m.get(y_key))]
    if points:
      ax.scatter(*zip(*points), label='/'.join(map(str, values)), alpha=0.8)
  ax.set_xlabel(xlabel)
  ax.set_ylabel(ylabel)
  ax.set_title(title, fontsize=11)
  ax.grid(alpha=0.3)
  ax.legend(fontsize=8)
  fig.tight_layout()
  fig.savefig(os.path.join(settings.out, file), dpi=90)
  plt.close(fig)
  return file, title


def curves_and_final_loss(settings, records: list[dict], axes: list[str]):
  """The two plots of a script whose only comparison is the loss: curves and final values."""
  return [loss_curves(settings, records, line_axes=axes),
          bar_plot_of(settings, records, axes, 'final_eval_loss', ylabel='validation loss',
                      title='Final validation loss', file='final_loss.png')]
