r"""Mixture of experts against dense MLPs: at equal active and at equal total parameters,
top-1 against top-2, with and without the load-balancing loss, with a shared expert.

  python experiments/moe.py                       # quick, 3 seeds: about 12 minutes on 2 CPU cores
  python experiments/moe.py --variants=dense,top1,top1_unbalanced --seeds=3
  python experiments/moe.py --scale=full          # a GPU or TPU

Every model is the common base (pre-norm, RoPE, SwiGLU of width F = 8/3 d); the variants
change its MLPs (models/moe.py, softmax router, dropless compute, balance loss weight 0.01
unless said otherwise):
  dense            F wide: the baseline.
  dense_total      8F wide: as many parameters as top1's 8 experts, 8 times the compute.
  top1             Switch Transformer: 8 experts of width F, top-1. Same active parameters
                   (and FLOPs) per token as dense, 8 times the MLP parameters.
  top1_unbalanced  top1 without the balancing loss (weight 0).
  top2             16 experts of width F/2, top-2 (fine-grained): the active and total
                   parameters of top1.
  top1_shared      16 experts of width F/2, top-1, plus a shared expert of width F/2 that
                   every token passes (DeepSeekMoE): the active parameters of top1 again.

What the papers claim: Switch Transformer (Fedus et al. 2021) reaches a dense T5's quality
several times sooner at equal FLOPs per token, and keeps its experts in use only with the
auxiliary balancing loss (without it, routing collapses onto few experts, as Shazeer et al.
2017 saw). DeepSeekMoE (Dai et al. 2024) reports that fine-grained experts with shared ones
beat GShard's top-2 at equal active and total parameters. A dense model of equal total
parameters does at least as well as the MoE, at several times its compute.

Measured on the first validation batch after training: the expert-load entropy (1: every
layer's assignments spread evenly over its experts, 0 when all go to one) and the
busiest expert's share of a layer's assignments (1/E when even), means over MoE layers.
Writes to --out: results.csv, results.md, loss_curves.png, final_loss.png, load.png.
"""
import jax
import numpy as np
from absl import app, flags
from flax import nnx

from lmlab.experiments import grid, report
from lmlab.models import moe
from lmlab.models.registry import active_param_count

EXPERTS = 8
VARIANTS = ('dense', 'dense_total', 'top1', 'top1_unbalanced', 'top2', 'top1_shared')

flags.DEFINE_list('variants', list(VARIANTS), f'MLP variants to compare ({", ".join(VARIANTS)}).')


def variant_fields(variant: str, ffn_dim: int) -> dict:
  """The ModelConfig fields of a variant, for a base whose MLPs are ffn_dim wide."""
  half = ffn_dim // 2
  return {
      'dense': {},
      'dense_total': dict(ffn_dim=EXPERTS * ffn_dim),
      'top1': dict(moe_experts=EXPERTS, moe_top_k=1),
      'top1_unbalanced': dict(moe_experts=EXPERTS, moe_top_k=1, moe_aux_loss_weight=0.0),
      'top2': dict(moe_experts=2 * EXPERTS, moe_top_k=2, moe_ffn_dim=half),
      'top1_shared': dict(moe_experts=2 * EXPERTS, moe_top_k=1, moe_ffn_dim=half,
                          moe_shared_ffn_dim=half),
  }[variant]


def routing(trained: grid.Trained) -> dict:
  """Active parameters, and how the final model spreads a validation batch over experts
  (the metrics training logs, models/moe.py:router_losses)."""
  record = {'active_params': active_param_count(trained.model)}
  if not trained.model.moe_experts or trained.params is None:
    return record
  forward = nnx.capture(lambda model, tokens: model(tokens), nnx.Intermediate)
  _, stats = jax.jit(lambda params, tokens: forward(nnx.merge(trained.graphdef, params),
                                                    tokens))(trained.params,
                                                             trained.val_batch()['inputs'])
  _, metrics = moe.router_losses(stats, trained.model)
  busiest = [float(value) for name, value in metrics.items()
             if name.startswith('moe_max_load_')]
  return {**record, 'load_entropy': float(metrics['moe_load_entropy']),
          'busiest_share': float(np.mean(busiest))}


def run():
  settings = grid.Settings('moe', {'quick': dict(seeds=3)})
  axes = {'variant': settings.values('variants', choices=VARIANTS)}

  def configure(cell, setup):
    return setup.with_model(**variant_fields(cell['variant'], setup.model.ffn_dim))

  records = grid.run(settings, settings.cells(axes), configure, measure=routing)
  shown = settings.shown_axes(axes)
  plots = report.curves_and_final_loss(settings, records, shown)
  plots.append(report.bar_plot_of(settings, records, shown, 'busiest_share',
                                  ylabel='busiest expert\'s share of assignments',
                                  title='Routing collapse (1/E when balanced)', file='load.png'))
  report.write(
      settings, records, title='Mixture of experts against dense MLPs',
      intro=f'dense: SwiGLU MLPs of width F; dense_total: 8F; top1: {EXPERTS} experts of width '
            'F, top-1 (Switch); top1_unbalanced: the same without the balancing loss; top2: '
            f'{2 * EXPERTS} experts of width F/2, top-2; top1_shared: {2 * EXPERTS} of F/2, top-1, '
            'and a shared expert of F/2 (DeepSeekMoE). The four MoE variants have the active '
            'parameters of dense and about the total parameters of dense_total.',
      axes=shown, plots=plots,
      columns=[report.Column('final_eval_loss', 'validation loss'),
               report.Column('params', 'parameters', 0),
               report.Column('active_params', 'active per token', 0),
               report.Column('load_entropy', 'load entropy'),
               report.Column('busiest_share', 'busiest expert share'),
               report.Column('step_ms', 'ms/step', 1)])


main = grid.entry_point(run)

if __name__ == '__main__':
  app.run(main)
