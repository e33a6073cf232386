r"""Initialisations of the q, k and v projections: what trains and what does not.

  python experiments/initialisation.py                 # quick: about 6 minutes on 2 CPU cores
  python experiments/initialisation.py --qkv_inits=normal,zero --steps=1000
  python experiments/initialisation.py --scale=full    # a GPU or TPU

Every other weight keeps the model's own initialisation (normal, std init_std = 0.02); the
q, k and v kernels of every layer are then replaced before training starts:
  normal   the model's own: N(0, init_std^2)
  xavier   N(0, 2 / (fan_in + fan_out))             (Glorot & Bengio 2010)
  he       N(0, 2 / fan_in)                         (He et al. 2015)
  zero     all 0
  one      all 1

Per run: the loss curves; the final validation loss; at initialisation the gradient norm of
the q and k kernels and the attention entropy (1: uniform); after training the attention
entropy and how alike the heads' q projections are (mean cosine similarity between heads:
about 0 for random weights, 1 for identical heads, empty for all-zero weights).

What to expect: with q = k = 0 every score is 0, so the gradients of Wq and Wk are exactly
zero and stay zero: attention remains a uniform average over the past and only the values,
MLPs and embeddings learn. With all-one kernels every head computes the same thing and the
logits are huge (each q and k entry sums all d_model inputs), so the softmax saturates;
the heads can only drift apart through the other weights. Normal, Xavier and He train;
their scales differ (He > Xavier > 0.02 here), which shows in the entropy at init.

Writes to --out: results.csv, results.md, loss_curves.png and final_loss.png.
"""
import dataclasses
import math
import re
import zlib

import jax
import jax.numpy as jnp
from absl import app, flags

from lmlab.experiments import grid, probes, report

INITS = ('normal', 'xavier', 'he', 'zero', 'one')
flags.DEFINE_list('qkv_inits', list(INITS), f'q/k/v initialisations: {", ".join(INITS)}.')

QKV_KERNEL = r'blocks/\d+/attention/[qkv]_proj/kernel'
PROBE_SEQUENCES = 4


def qkv_initialiser(kind: str, seed: int):
  """params -> params with every q/k/v kernel drawn anew by `kind` (not for 'normal')."""

  def draw(key_path, kernel):
    name = probes.path_name(key_path)
    if not re.fullmatch(QKV_KERNEL, name):
      return kernel
    if kind in ('zero', 'one'):
      return jnp.full_like(kernel, 0.0 if kind == 'zero' else 1.0)
    fan_in, fan_out = kernel.shape
    std = math.sqrt(2.0 / (fan_in + fan_out) if kind == 'xavier' else 2.0 / fan_in)
    key = jax.random.fold_in(jax.random.key(seed), zlib.crc32(name.encode()))
    return (std * jax.random.normal(key, kernel.shape)).astype(kernel.dtype)

  return lambda params: jax.tree_util.tree_map_with_path(draw, params)


def measure(trained):
  n_heads = trained.model.n_heads
  batch = trained.val_batch(batch_size=PROBE_SEQUENCES)
  initial = trained.initial_params()
  qk_grads = probes.gradient_norms(trained.graphdef, initial, batch,
                                   {'qk': 'attention/(q|k)_proj/kernel'})['qk']
  record = {'init_qk_grad': sum(qk_grads) / len(qk_grads),
            'init_entropy': probes.attention_stats(trained.graphdef, initial, batch)['entropy'],
            'init_head_similarity': probes.head_similarity(initial, 'q_proj', n_heads)}
  if trained.params is not None:
    record.update(
        final_entropy=probes.attention_stats(trained.graphdef, trained.params, batch)['entropy'],
        final_head_similarity=probes.head_similarity(trained.params, 'q_proj', n_heads))
  return record


def run():
  settings = grid.Settings('initialisation')
  axes = {'qkv_init': settings.values('qkv_inits', choices=INITS)}

  def configure(cell, setup):
    if cell['qkv_init'] == 'normal':
      return setup
    return dataclasses.replace(setup, init_params=qkv_initialiser(cell['qkv_init'],
                                                                  setup.train.seed),
                               init_description=f'qkv {cell["qkv_init"]}')

  records = grid.run(settings, settings.cells(axes), configure, measure)
  shown = settings.shown_axes(axes)
  plots = report.curves_and_final_loss(settings, records, shown)
  report.write(
      settings, records, title='Initialisation of the q, k and v projections', axes=shown,
      intro='Only the q/k/v kernels change; every other weight keeps the model\'s N(0, 0.02^2).',
      plots=plots,
      columns=[report.Column('final_eval_loss', 'validation loss'),
               report.Column('initial_eval_loss', 'loss at step 0'),
               report.Column('diverged', 'diverged'),
               report.Column('init_qk_grad', 'grad norm Wq,Wk at init', 4),
               report.Column('init_entropy', 'entropy at init'),
               report.Column('final_entropy', 'entropy after training'),
               report.Column('init_head_similarity', 'head similarity at init'),
               report.Column('final_head_similarity', 'head similarity after training')],
      notes='Entropy: attention entropy over log(keys seen), 1 = uniform. Head similarity: mean '
            'cosine similarity between different heads\' q projections (— for all-zero).')


main = grid.entry_point(run)

if __name__ == '__main__':
  app.run(main)
