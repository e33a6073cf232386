r"""Length extrapolation of position encodings, and RoPE's context-extension methods.

  python experiments/position_extrapolation.py          # quick: about 14 minutes on 2 CPU cores
  python experiments/position_extrapolation.py --positions=rope,alibi --eval_multiples=1,4,16
  python experiments/position_extrapolation.py --scale=full  # a GPU or TPU

Every position encoding (sinusoidal, learned, RoPE, ALiBi, none) is trained at length L
(--seq_len) and evaluated at L, 2L, 4L and 8L (--eval_multiples), each length on the same
number of validation tokens; perplexity is over all positions of each window. A learned table
has L rows, so it cannot go past L: its longer columns are empty.

For RoPE, the scalings of models/rope_scaling.py are also applied at evaluation without any
training, with factor = evaluation length / L: PI (position interpolation, Chen et al. 2023;
rope_type linear), NTK-aware (ntk), dynamic NTK (dynamic: the base follows the length, so its
factor is 1) and YaRN (Peng et al. 2023). Then RoPE is fine-tuned for --finetune_steps at
--finetune_multiple x L, plain and with each scaling at factor --finetune_multiple (same
tokens per step), and evaluated at every length again with that factor.

What to expect (Press et al. 2022, ALiBi; Peng et al. 2023, YaRN): sinusoidal and learned
positions degrade fast past L; RoPE degrades too; ALiBi stays near its L perplexity at 2-8L,
as may no position encoding at all in a causal decoder (Haviv et al. 2022). Without training,
NTK-aware, dynamic NTK and YaRN hold up better than PI; after a short fine-tune PI and YaRN
recover, YaRN with the fewest steps. At byte level with L=64, "long range" is short, so
the curves say more about what happens past the trained positions than about long documents.

Writes to --out: results.csv (one row per run and evaluation), results.md, loss_curves.png
and perplexity_vs_length.png.
"""
import dataclasses
import json
import math
import os

from absl import app, flags

from lmlab.experiments import grid, report
from lmlab.models.config import POSITIONS

flags.DEFINE_list('positions', ['sinusoidal', 'learned', 'rope', 'alibi', 'none'],
                  'Position encodings to train (models.config.POSITIONS).')
flags.DEFINE_list('eval_multiples', ['1', '2', '4', '8'], 'Evaluation lengths, as multiples '
                  'of --seq_len.')
flags.DEFINE_list('rope_scalings', ['pi', 'ntk', 'dynamic', 'yarn'], 'RoPE scalings applied at '
                  'evaluation without training.')
flags.DEFINE_list('finetune_scalings', ['none', 'pi', 'ntk', 'yarn'], 'RoPE fine-tuned at the '
                  'longer length, plain (none) or with these scalings.')
flags.DEFINE_integer('finetune_multiple', 4, 'Fine-tuning length as a multiple of --seq_len.')
flags.DEFINE_integer('finetune_steps', None, 'Fine-tuning steps (0: no fine-tuning).')
flags.DEFINE_float('finetune_learning_rate', None, 'Fine-tuning peak learning rate.')

FLAGS = flags.FLAGS
SCALE_DEFAULTS = {'quick': dict(finetune_steps=50, finetune_learning_rate=1e-3),
                  'full': dict(finetune_steps=500, finetune_learning_rate=3e-4)}
ROPE_TYPES = {'pi': 'linear', 'ntk': 'ntk', 'dynamic': 'dynamic', 'yarn': 'yarn'}
NO_SCALING, NOT_FINETUNED = '—', 'no'


def rope_scaling(scaling: str, factor: float, trained_len: int) -> str:
  """The rope_scaling JSON of a scaling for `factor` times the trained length ('' for none)."""
  if scaling == 'none':
    return ''
  return json.dumps({'rope_type': ROPE_TYPES[scaling],
                     'factor': 1.0 if scaling == 'dynamic' else float(factor),
                     'original_max_position_embeddings': trained_len})


def perplexity(trained, model, length: int):
  """exp(validation loss) of the trained parameters run as `model` on windows of `length`;
  None past a learned table or for a diverged run."""
  if trained.params is None or (model.position == 'learned' and length > model.max_seq_len):
    return None
  loss = trained.eval_loss(trained.params, length, graphdef=grid.graphdef_of(model))
  return math.exp(min(loss, 700))


def run():
  settings = grid.Settings('position_extrapolation', SCALE_DEFAULTS)
  positions = settings.values('positions', choices=POSITIONS)
  multiples = settings.values('eval_multiples', int)
  scalings = settings.values('rope_scalings', choices=tuple(ROPE_TYPES))
  finetune_scalings = settings.values('finetune_scalings', choices=('none', *ROPE_TYPES))
  finetune_multiple, finetune_steps = FLAGS.finetune_multiple, settings.value('finetune_steps')
  if min(multiples) < 1 or finetune_multiple < 1 or finetune_steps < 0:
    raise grid.ExperimentError('--eval_multiples and --finetune_multiple must be >= 1 and '
                               '--finetune_steps >= 0')
  trained_len = settings.value('seq_len')

  def perplexities(trained):
    return {f'ppl_x{m}': perplexity(trained, trained.model, m * trained_len) for m in multiples}

  def measure_base(trained):
    measured = perplexities(trained)
    if trained.model.position == 'rope':
      for scaling in scalings:
        measured.update({f'{scaling}_ppl_x{m}': perplexity(
            trained, dataclasses.replace(trained.model,
                                         rope_scaling=rope_scaling(scaling, m, trained_len)),
            m * trained_len) for m in multiples if m > 1})
    return measured

  axes = {'position': positions}
  base = grid.run(settings, settings.cells(axes), lambda cell, setup: setup.with_model(
      position=cell['position']), measure_base)

  finetuned = []
  rope_cells = [c for c in settings.cells(axes) if c['position'] == 'rope']
  if finetune_steps and rope_cells:
    def configure_finetune(cell, setup):
      base_cell = {k: v for k, v in cell.items() if k != 'finetune'}
      source = next(r for r in base if {k: r[k] for k in base_cell} == base_cell
                    and r['seed'] == setup.train.seed)
      source_dir = os.path.join(settings.out, source['workdir'])
      length = finetune_multiple * trained_len
      setup = (setup.with_model(position='rope', rope_scaling=rope_scaling(
                   cell['finetune'], finetune_multiple, trained_len))
               .with_train(seq_len=length, steps=finetune_steps,
                           batch_size=max(1, setup.train.batch_size // finetune_multiple),
                           eval_every=max(1, finetune_steps // 2), save_every=finetune_steps)
               .with_optimizer(learning_rate=settings.value('finetune_learning_rate'),
                               warmup_steps=finetune_steps // 10, total_steps=finetune_steps))
      return dataclasses.replace(setup, init_params=lambda _: grid.final_params(source_dir),
                                 init_description=f'fine-tuned from {source["workdir"]}')

    cells = [{**c, 'finetune': s} for c in rope_cells for s in finetune_scalings]
    finetuned = grid.run(settings, cells, configure_finetune, perplexities)

  rows = evaluation_rows(base, finetuned, scalings, multiples,
                         f'{finetune_steps} steps at {finetune_multiple * trained_len}')
  common = [a for a in settings.shown_axes(axes) if a not in axes]
  row_axes = ['position', 'rope scaling', 'fine-tuned'] + common
  plots = [report.loss_curves(settings, base, line_axes=settings.shown_axes(axes)),
           plot_perplexity(settings, rows, row_axes, multiples, trained_len)]
  report.write(
      settings, rows, title='Position encodings beyond the training length', axes=row_axes,
      intro=f'Trained at L={trained_len}; perplexity on validation windows of each length.',
      plots=plots,
      columns=[report.Column(f'ppl_x{m}', f'ppl @ {m * trained_len}', 2) for m in multiples],
      notes='Learned positions have a table of L rows and cannot run longer windows (—). '
            'RoPE scalings at evaluation use factor = length / L (dynamic NTK: factor 1, its '
            'base follows the length); at L they are the identity, so their first column is '
            'left empty. Fine-tuned rows keep the factor they were fine-tuned with.')


def evaluation_rows(base, finetuned, scalings, multiples, finetune_label):
  """One row per run and evaluation: each base run as trained, RoPE runs under each scaling
  at evaluation time, and the fine-tuned runs."""
  def row(record, scaling, tuned, prefix=''):
    kept = {k: v for k, v in record.items() if not k.startswith('ppl_x') and '_ppl_x' not in k}
    values = {f'ppl_x{m}': record.get(f'{prefix}ppl_x{m}') for m in multiples}
    return {**kept, 'rope scaling': scaling, 'fine-tuned': tuned, **values}

  rows = [row(r, NO_SCALING, NOT_FINETUNED) for r in base]
  rows += [row(r, s, NOT_FINETUNED, f'{s}_') for s in scalings for r in base
           if r['position'] == 'rope']
  rows += [row(r, NO_SCALING if r['finetune'] == 'none' else r['finetune'], finetune_label)
           for r in finetuned]
  return [{k: v for k, v in r.items() if k != 'finetune'} for r in rows]


def plot_perplexity(settings, rows, row_axes, multiples, trained_len):
  panels = {}
  for values, members in report.group(rows, row_axes).items():
    cell = dict(zip(row_axes, values))
    if cell['fine-tuned'] != NOT_FINETUNED:
      panel = f'RoPE fine-tuned ({cell["fine-tuned"]})'
    elif cell['rope scaling'] != NO_SCALING:
      panel = 'RoPE, scaled at evaluation only'
    else:
      panel = 'as trained'
    lengths, means, stds = [], [], []
    for m in multiples:
      mean, std = report.mean_std(r[f'ppl_x{m}'] for r in members)
      if math.isfinite(mean):
        lengths.append(m * trained_len)
        means.append(mean)
        stds.append(std)
    label = '/'.join(str(v) for a, v in cell.items() if a != 'fine-tuned' and v != NO_SCALING)
    panels.setdefault(panel, {})[label] = (lengths, means, stds)
  file = 'perplexity_vs_length.png'
  report.line_plot(os.path.join(settings.out, file), panels, xlabel='evaluation length',
                   ylabel='validation perplexity', logx=True, logy=True, markers=True,
                   title=f'Perplexity against evaluation length (trained at {trained_len})')
  return file, 'perplexity against evaluation length'


main = grid.entry_point(run)

if __name__ == '__main__':
  app.run(main)
