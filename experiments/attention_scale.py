r"""The softmax scale of attention: 1/sqrt(d), 1/d, d^(-1/3) and none, over head dimensions.

  python experiments/attention_scale.py                # quick: about 14 minutes on 2 CPU cores
  python experiments/attention_scale.py --head_dims=8,32,128 --set init_std=0.1
  python experiments/attention_scale.py --scale=full   # a GPU or TPU

Vaswani et al. (2017) divide q.k by sqrt(d): with q and k of unit-variance components, q.k
has variance d, so the scaled logits keep unit variance whatever the head size; without the
scale, large heads push the softmax into saturation, where its gradient vanishes. 1/d (muP,
Yang et al. 2022) shrinks the logits as d grows; d^(-1/3) sits in between.

Per run, at initialisation and after training: the attention entropy (a row's entropy over
log of its number of keys: 1 is uniform, 0 one-hot) and the share of saturated rows (more
than 0.9 of the weight on one key, among rows that see at least 8 keys), on one validation
batch, averaged over layers; at initialisation also the gradient norm of the q and k
projections (mean over layers); and the training curves.

What to expect: with the default init (std 0.02) q and k are small, so every scale starts
near uniform attention and the differences at initialisation are small; the textbook
argument is about unit-variance q and k (try --set init_std=0.1 or larger). During training,
no scale and d^(-1/3) let the logits grow faster with d, 1/d slows learning for large heads.

Writes to --out: results.csv, results.md, loss_curves.png and attention_entropy.png.
"""
import os

from absl import app, flags

from lmlab.experiments import grid, probes, report
from lmlab.models.config import ATTENTION_SCALES

flags.DEFINE_list('softmax_scales', ['inv_sqrt_d', 'inv_d', 'inv_cbrt_d', 'none'],
                  'Softmax scales (models.config.ATTENTION_SCALES).')
flags.DEFINE_list('head_dims', None, 'Head dimensions (d in the scale); n_heads stays fixed.')

SCALE_DEFAULTS = {'quick': dict(head_dims=[16, 64]), 'full': dict(head_dims=[64, 256])}
PROBE_SEQUENCES = 4  # The attention statistics read every layer's [T, T] weights; few suffice.


def measure(trained):
  batch = trained.val_batch(batch_size=PROBE_SEQUENCES)
  initial = trained.initial_params()
  at_init = probes.attention_stats(trained.graphdef, initial, batch)
  qk_grads = probes.gradient_norms(trained.graphdef, initial, batch,
                                   {'qk': 'attention/(q|k)_proj/kernel'})['qk']
  record = {'init_entropy': at_init['entropy'], 'init_saturated': at_init['saturated'],
            'init_qk_grad': sum(qk_grads) / len(qk_grads)}
  if trained.params is not None:
    after = probes.attention_stats(trained.graphdef, trained.params, batch)
    record.update(final_entropy=after['entropy'], final_saturated=after['saturated'])
  return record


def plot_attention(settings, records, axes):
  panels = {}
  for key, title in (('init_entropy', 'entropy at initialisation'),
                     ('final_entropy', 'entropy after training'),
                     ('init_saturated', 'saturated rows at initialisation'),
                     ('final_saturated', 'saturated rows after training')):
    series = {}
    for (scale,), members in report.group(records, ['softmax_scale']).items():
      by_dim = report.group(members, ['head_dim'])
      stats = [report.mean_std(m.get(key) for m in cell) for cell in by_dim.values()]
      series[scale] = ([d for d, in by_dim], *map(list, zip(*stats)))
    panels[title] = series
  file = 'attention_entropy.png'
  report.line_plot(os.path.join(settings.out, file), panels, xlabel='head dimension d',
                   ylabel='entropy / log(keys)  or  share of rows', logx=True, markers=True,
                   title='Attention softmax by scale and head dimension')
  return file, 'attention entropy and saturation'


def run():
  settings = grid.Settings('attention_scale', SCALE_DEFAULTS)
  axes = {'softmax_scale': settings.values('softmax_scales', choices=ATTENTION_SCALES),
          'head_dim': settings.values('head_dims', int)}
  if min(axes['head_dim']) < 1:
    raise grid.ExperimentError('--head_dims must be positive')

  def configure(cell, setup):
    return setup.with_model(attention_scale=cell['softmax_scale'], head_dim=cell['head_dim'])

  records = grid.run(settings, settings.cells(axes), configure, measure)
  shown = settings.shown_axes(axes)
  plots = [report.loss_curves(settings, records, line_axes=['softmax_scale'],
                              panel_axes=[a for a in shown if a != 'softmax_scale']),
           plot_attention(settings, records, axes)]
  report.write(
      settings, records, title='Softmax scale of attention', axes=shown, plots=plots,
      intro='q.k multiplied by 1/sqrt(d), 1/d, d^(-1/3) or 1, for heads of d features.',
      columns=[report.Column('final_eval_loss', 'validation loss'),
               report.Column('diverged', 'diverged'),
               report.Column('init_entropy', 'entropy at init'),
               report.Column('init_saturated', 'saturated at init'),
               report.Column('init_qk_grad', 'grad norm Wq,Wk at init', 4),
               report.Column('final_entropy', 'entropy after training'),
               report.Column('final_saturated', 'saturated after training')],
      notes='Entropy: a softmax row\'s entropy over log(number of keys it sees), averaged over '
            'rows and layers (1: uniform). Saturated: rows with more than 0.9 of their weight '
            'on one key, among those that see at least 8 keys.')


main = grid.entry_point(run)

if __name__ == '__main__':
  app.run(main)
