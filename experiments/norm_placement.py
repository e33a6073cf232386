r"""Post-LN, Pre-LN, Sandwich and DeepNorm, with LayerNorm and RMSNorm, over depth, learning
rate and warmup.

  python experiments/norm_placement.py                 # quick: about 15 minutes on 2 CPU cores
  python experiments/norm_placement.py --norms=layernorm,rmsnorm   # and RMSNorm: 30 minutes
  python experiments/norm_placement.py --placements=post,pre --n_layers=4,16,32 \
      --learning_rate=1e-3,1e-2 --warmup_steps=0,100 --steps=1000
  python experiments/norm_placement.py --scale=full    # a GPU or TPU

The claims: Post-LN needs a learning-rate warmup and Pre-LN trains without one (Xiong et al.
2020); DeepNorm makes a deep Post-LN stack trainable (Wang et al. 2022, DeepNet); RMSNorm is
faster than LayerNorm at equal quality (Zhang & Sennrich 2019).

Per run: the final validation loss; whether it diverged (a non-finite loss, or a final
validation loss no lower than at initialisation); the steps until the training loss (mean of
3 logs) reaches --target_loss; the gradient norm of each layer's FFN output matrix at
initialisation (Xiong et al.'s figure 3: it grows with depth for Post-LN and stays flat for
Pre-LN); and the median wall time per step.

What to expect: without warmup, Post-LN ends higher than Pre-LN or fails, and the gap grows
with depth and learning rate; warmup narrows it; DeepNorm and Pre-LN/Sandwich train at every
depth; LayerNorm and RMSNorm end at about the same loss. On a CPU the step time is dominated by
the matrix products, so RMSNorm's saving (7-64% of the step in Zhang & Sennrich's RNNs and
Transformers) may not show.

Writes to --out: results.csv, results.md, loss_curves.png, grad_norms_at_init.png and
final_loss_vs_depth.png.
"""
import os

from absl import app, flags

from lmlab.experiments import grid, probes, report
from lmlab.models.config import NORM_PLACEMENTS, NORMS

flags.DEFINE_list('placements', ['post', 'pre', 'sandwich', 'deepnorm'], 'Norm placements '
                  '(models.config.NORM_PLACEMENTS).')
flags.DEFINE_list('norms', None, 'Norms (models.config.NORMS); default: layernorm for the quick '
                  'scale, layernorm and rmsnorm for the full one.')

SCALE_DEFAULTS = {
    # LayerNorm alone keeps the quick grid within 15 minutes; --norms=layernorm,rmsnorm
    # doubles it.
    'quick': dict(d_model=32, steps=120, n_layers=[2, 8], learning_rate=[1e-2, 1e-1],
                  warmup_steps=[0, 30], norms=['layernorm'], eval_every=40, eval_batches=4,
                  target_loss=2.8),
    # 96 cells, 288 runs of 3000 steps with the full scale's 3 seeds.
    'full': dict(n_layers=[6, 24, 48], learning_rate=[1e-3, 5e-3], warmup_steps=[0, 1000],
                 norms=['layernorm', 'rmsnorm'], steps=3000),
}


PLACEMENT_NAMES = {'post': 'Post-LN (Vaswani et al. 2017)', 'pre': 'Pre-LN (Xiong et al. 2020)',
                   'sandwich': 'Sandwich (Ding et al. 2021)',
                   'deepnorm': 'DeepNorm (Wang et al. 2022)'}
NORM_NAMES = {'layernorm': 'LayerNorm', 'rmsnorm': 'RMSNorm'}


def _listed(names) -> str:
  """'a', 'a and b', 'a, b and c'."""
  names = list(names)
  return ' and '.join(filter(None, [', '.join(names[:-1]), names[-1]]))


def measure(trained):
  norms = probes.gradient_norms(trained.graphdef, trained.initial_params(), trained.val_batch(),
                                {'ffn_out': 'mlp/down/kernel'})['ffn_out']
  return {'init_grad_per_layer': norms, 'init_grad_first': norms[0],
          'init_grad_last': norms[-1], 'init_grad_last_over_first': norms[-1] / norms[0]}


def plot_grad_norms(settings, records, line_axes):
  """Runs that differ only in learning rate or warmup start alike; all count in the mean."""
  panels = {}
  for (depth,), by_depth in report.group(records, ['n_layers']).items():
    series = {}
    for values, members in report.group(by_depth, line_axes).items():
      per_layer = [report.mean_std(norms)
                   for norms in zip(*(m['init_grad_per_layer'] for m in members))]
      series['/'.join(values)] = (list(range(1, depth + 1)), *map(list, zip(*per_layer)))
    panels[f'{depth} layers'] = series
  file = 'grad_norms_at_init.png'
  report.line_plot(os.path.join(settings.out, file), panels, xlabel='layer',
                   ylabel='|grad| of FFN output matrix', logy=True, markers=True,
                   title='Gradient norm per layer at initialisation (Xiong et al. 2020, fig. 3)')
  return file, 'gradient norm per layer at initialisation'


def plot_loss_vs_depth(settings, records, line_axes):
  panel_axes = ['learning_rate', 'warmup_steps']
  panels = {}
  for panel_values, panel_records in report.group(records, panel_axes).items():
    series = {}
    for values, members in report.group(panel_records, line_axes).items():
      by_depth = report.group(members, ['n_layers'])
      stats = [report.mean_std(m['final_eval_loss'] for m in cell) for cell in by_depth.values()]
      series['/'.join(values)] = ([depth for depth, in by_depth], *map(list, zip(*stats)))
    panels[f'lr {panel_values[0]}, warmup {panel_values[1]}'] = series
  file = 'final_loss_vs_depth.png'
  report.line_plot(os.path.join(settings.out, file), panels, xlabel='layers', markers=True,
                   ylabel='final validation loss', title='Final validation loss against depth')
  return file, 'final validation loss against depth'


def run():
  settings = grid.Settings('norm_placement', SCALE_DEFAULTS)
  axes = {'placement': settings.values('placements', choices=NORM_PLACEMENTS),
          'norm': settings.values('norms', choices=NORMS)}

  def configure(cell, setup):
    return setup.with_model(norm_placement=cell['placement'], norm=cell['norm'])

  records = grid.run(settings, settings.cells(axes), configure, measure)
  shown = settings.shown_axes(axes)
  plots = [report.loss_curves(settings, records, line_axes=list(axes),
                              panel_axes=[a for a in shown if a not in axes]),
           plot_grad_norms(settings, records, list(axes)),
           plot_loss_vs_depth(settings, records, list(axes))]
  report.write(
      settings, records, title='Norm placement and norm type', axes=shown, plots=plots,
      intro=f'{_listed(PLACEMENT_NAMES[p] for p in axes["placement"])}, each with '
            f'{_listed(NORM_NAMES[n] for n in axes["norm"])}.',
      columns=[report.Column('final_eval_loss', 'validation loss'),
               report.Column('diverged', 'diverged'),
               report.Column('steps_to_target', 'steps to target loss', 0),
               report.Column('init_grad_first', 'grad norm W2, layer 1, at init', 4),
               report.Column('init_grad_last', 'grad norm W2, last layer, at init', 4),
               report.Column('step_ms', 'ms/step', 1)],
      notes=f'Target loss {settings.value("target_loss")}. grad norm W2: the gradient norm of the '
            'FFN output matrix on one validation batch at initialisation.')


main = grid.entry_point(run)

if __name__ == '__main__':
  app.run(main)
