r"""MHA, GQA, MQA and MLA at matched parameter counts: quality, KV cache and decode speed.

  python experiments/attention_types.py                # quick: about 10 minutes on 2 CPU cores
  python experiments/attention_types.py --attention_variants=mha,gqa:2,mla --mla_kv_rank=32
  python experiments/attention_types.py --scale=full   # a GPU or TPU

Variants: mha (as many K/V heads as query heads), gqa:G (G K/V heads shared by groups of
query heads; Ainslie et al. 2023), mqa (one K/V head; Shazeer 2019) and mla (DeepSeek-V2's
multi-head latent attention: a joint K/V latent of --mla_kv_rank features, 4 x head_dim by
default as in DeepSeek-V2, and a decoupled RoPE key of head_dim / 2). Each variant's FFN width
is set so that its parameter count matches MHA's; the table shows the counts.

Per run: validation loss; KV-cache bytes per token (models/cache_size.py, in the compute
dtype); the prefill time of a --decode_batch x seq_len prompt and the decode speed with the
cache (models.generation.make_generate, greedy, median of 3 calls after a warm-up).

What to expect: Shazeer 2019 and Ainslie et al. 2023 report MQA slightly worse than MHA and
GQA close to MHA, with a cache n_heads / G times smaller; DeepSeek-V2 reports MLA at or above
MHA with a cache of (d_c + d_rope) elements per layer. Decode on accelerators is bound by
reading the cache, so smaller caches decode faster there; on a CPU with a model this small,
the weights and per-token overheads dominate and the decode speeds may hardly differ.

Writes to --out: results.csv, results.md, loss_curves.png, loss_vs_kv_cache.png and
decode_speed.png.
"""
import os

from absl import app, flags

from lmlab.experiments import grid, probes, report
from lmlab.models.cache_size import kv_cache_bytes_per_token

flags.DEFINE_list('attention_variants', ['mha', 'gqa:4', 'gqa:2', 'mqa', 'mla'],
                  'mha, gqa:<K/V heads>, mqa, mla.')
flags.DEFINE_integer('mla_kv_rank', 0, 'MLA\'s K/V latent width d_c; 0: 4 x head_dim.')
flags.DEFINE_integer('decode_batch', 8, 'Sequences decoded at once in the speed measurement.')

SCALE_DEFAULTS = {'quick': dict(n_heads=8, head_dim=16), 'full': dict(n_heads=16, head_dim=64)}


def variant_fields(variant: str, n_heads: int, head_dim: int, mla_kv_rank: int) -> dict:
  """The ModelConfig fields of one --attention_variants entry."""
  if variant == 'mha':
    return {'n_kv_heads': n_heads}
  if variant == 'mqa':
    return {'n_kv_heads': 1}
  if variant == 'mla':
    return {'attention_type': 'mla', 'kv_lora_rank': mla_kv_rank or 4 * head_dim,
            'qk_rope_head_dim': head_dim // 2, 'qk_nope_head_dim': head_dim,
            'v_head_dim': head_dim}
  kind, _, groups = variant.partition(':')
  if kind != 'gqa' or not groups.isdigit() or int(groups) < 1 or n_heads % int(groups):
    raise grid.ExperimentError(
        f'--attention_variants: {variant!r} is not mha, mqa, mla or gqa:<K/V heads> with a '
        f'divisor of --n_heads={n_heads}')
  return {'n_kv_heads': int(groups)}


def measure(trained):
  measured = {'kv_bytes_per_token': kv_cache_bytes_per_token(trained.model)}
  if trained.params is not None:
    seq_len = trained.setup.train.seq_len
    measured['prefill_ms'], measured['decode_tokens_per_s'] = probes.decode_speed(
        trained.graphdef, trained.params, trained.model.vocab_size,
        batch=flags.FLAGS.decode_batch, prompt_len=seq_len, new_tokens=seq_len)
  return measured


def plot_loss_vs_cache(settings, records, axes):
  series = {}
  for values, members in report.group(records, axes).items():
    loss, std = report.mean_std(m['final_eval_loss'] for m in members)
    series['/'.join(map(str, values))] = ([members[0]['kv_bytes_per_token']], [loss], [std])
  file = 'loss_vs_kv_cache.png'
  report.line_plot(os.path.join(settings.out, file), {'': series}, markers=True, logx=True,
                   xlabel='KV cache bytes per token', ylabel='final validation loss',
                   title='Validation loss against KV-cache size')
  return file, 'validation loss against KV-cache bytes per token'


def run():
  settings = grid.Settings('attention_types', SCALE_DEFAULTS)
  axes = {'attention': settings.values('attention_variants')}
  n_heads = settings.value('n_heads')
  head_dim = settings.value('head_dim') or settings.value('d_model') // n_heads
  fields = {v: variant_fields(v, n_heads, head_dim, flags.FLAGS.mla_kv_rank)
            for v in axes['attention']}

  def configure(cell, setup):
    variant = setup.with_model(**fields[cell['attention']])
    mha = setup.with_model(**variant_fields('mha', n_heads, head_dim, 0))
    return variant.with_model(ffn_dim=grid.matched_ffn_dim(variant.model, mha.model))

  records = grid.run(settings, settings.cells(axes), configure, measure)
  shown = settings.shown_axes(axes)
  plots = [report.loss_curves(settings, records, line_axes=shown),
           plot_loss_vs_cache(settings, records, shown),
           report.bar_plot_of(settings, records, shown, 'decode_tokens_per_s',
                              ylabel='tokens/s', title='Decode speed with the KV cache',
                              file='decode_speed.png')]
  report.write(
      settings, records, title='Attention types: MHA, GQA, MQA, MLA', axes=shown, plots=plots,
      intro='Query heads share K/V heads in groups (GQA), all share one (MQA), or keys and '
            'values come from one cached latent (MLA); FFN widths equalise parameter counts.',
      columns=[report.Column('final_eval_loss', 'validation loss'),
               report.Column('params', 'parameters', 0),
               report.Column('kv_bytes_per_token', 'KV cache bytes/token', 0),
               report.Column('decode_tokens_per_s', 'decode tokens/s', 0),
               report.Column('prefill_ms', 'prefill ms', 1),
               report.Column('step_ms', 'train ms/step', 1)],
      notes=f'Decode: batch {flags.FLAGS.decode_batch}, prompt and new tokens of '
            f'{settings.value("seq_len")}.')


main = grid.entry_point(run)

if __name__ == '__main__':
  app.run(main)
