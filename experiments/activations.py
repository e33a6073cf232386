r"""ReLU, GELU, SwiGLU and GeGLU feed-forward layers at matched parameter counts.

  python experiments/activations.py                    # quick: about 7 minutes on 2 CPU cores
  python experiments/activations.py --mlps=relu,swiglu --seeds=4 --steps=1000
  python experiments/activations.py --scale=full       # a GPU or TPU

Shazeer (2020) replaced the FFN's activation by a gated linear unit, act(x W) * (x V) before
the output matrix. A gated FFN has three matrices instead of two, so at the same parameter
count its hidden width is 8/3 d instead of 4 d, as in the paper; the table's parameter
column shows the match. Everything else is the common base (pre-norm RMSNorm, RoPE).

What to expect: in the paper the gated variants reach a lower log-perplexity than ReLU and
GELU at equal steps and parameters (C4, 65k steps: ReLU 1.997, GELU 1.983, SwiGLU 1.944,
GeGLU 1.942). The gap is small, so a short CPU run needs several seeds to tell it from noise.

Writes to --out: results.csv, results.md (validation loss, parameters, ms per step),
loss_curves.png and final_loss.png.
"""

from absl import app, flags

from lmlab.experiments import grid, report
from lmlab.models.config import MLPS

flags.DEFINE_list('mlps', ['relu', 'gelu', 'swiglu', 'geglu'], 'Feed-forward kinds to compare '
                  '(models.config.MLPS).')


def run():
  settings = grid.Settings('activations')
  axes = {'mlp': settings.values('mlps', choices=MLPS)}

  def configure(cell, setup):
    return setup.with_model(mlp=cell['mlp'],
                            ffn_dim=grid.gated_ffn_dim(setup.model.d_model, cell['mlp']))

  records = grid.run(settings, settings.cells(axes), configure)
  shown = settings.shown_axes(axes)
  plots = report.curves_and_final_loss(settings, records, shown)
  report.write(
      settings, records, title='Feed-forward activations at matched parameters',
      intro='ReLU/GELU FFNs have a hidden width of 4 d, gated ones (SwiGLU, GeGLU) 8/3 d, so '
            'every model has the same parameter count (Shazeer 2020).',
      axes=shown, plots=plots,
      columns=[report.Column('final_eval_loss', 'validation loss'),
               report.Column('initial_eval_loss', 'loss at step 0'),
               report.Column('steps_to_target', 'steps to target loss', 0),
               report.Column('params', 'parameters', 0),
               report.Column('step_ms', 'ms/step', 1)])


main = grid.entry_point(run)

if __name__ == '__main__':
  app.run(main)
