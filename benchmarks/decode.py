r"""Decoding a trained run: validation loss, bytes and decode speed of each weight-only
quantisation, and of speculative decoding with a smaller draft run, in one table; then the
same for the KV cache held in float and in int8.

  python main.py --workdir=runs/tiny                       # the target, about 4 minutes
  python main.py --workdir=runs/tiny-draft --set d_model=64 --set n_layers=1 \
      --set n_heads=2 --set n_kv_heads=1 --set ffn_dim=192  # a draft, about 1 minute
  python benchmarks/decode.py --workdir=runs/tiny --draft=runs/tiny-draft

Rows: the float model (the anchor), each --quantize spec (models/weight_quant.py) and, with
--draft, speculative decoding (models/speculative.py) at each --gamma. Columns: validation
loss on the run's own validation split and its change from float (nats/token), the bytes of
the model's state, and tokens per second of greedy decoding of --new_tokens tokens after
--prompt, batch 1, one jitted loop (the median of --repeats runs, the rows alternating so
that drift hits all alike), with the speed-up over float. Speculative rows also give the
share of drafted tokens the target accepted and tokens per target forward pass.

The KV cache table (--kv_cache_dtypes, models/kv_cache.py): the loss of the second half of
each validation window with the first half read from the cache (a plain forward pass never
reads it; windows are not split at document ends here), its bytes per token, and greedy
decoding speed of the float weights.
"""
import jax
import jax.numpy as jnp
from absl import app, flags
from flax import nnx

from lmlab.benchmarks.timing import interleaved_medians
from lmlab.data import tokenizer as tokenizer_lib
from lmlab.models.cache_size import kv_cache_bytes_per_token
from lmlab.models.generation import SamplingConfig, make_generate
from lmlab.models.speculative import make_speculative_generate
from lmlab.training import run as run_lib
from lmlab.training.steps import cross_entropy
from lmlab.training.restored import restore

flags.DEFINE_string('workdir', 'runs/tiny', 'The trained run to decode from.')
flags.DEFINE_string('draft', None, 'A smaller run with the same tokenizer, for speculative rows.')
flags.DEFINE_list('quantize', ['int8', 'int8:asym', 'int4:g128', 'int4:g64', 'int4:g32',
                               'int4:g128:asym', 'int4:g32:asym'], 'Quantisation specs.')
flags.DEFINE_list('gamma', ['2', '4', '6'], 'Tokens drafted per round, one row each.')
flags.DEFINE_list('kv_cache_dtypes', ['int8'], 'KV cache dtypes beside the float one.')
flags.DEFINE_integer('new_tokens', 256, 'Tokens decoded per timed run.')
flags.DEFINE_string('prompt', 'def ', 'The prompt.')
flags.DEFINE_integer('repeats', 6, 'Timed runs per row (the median is reported).')

FLAGS = flags.FLAGS
# A token id no vocabulary has: every run decodes all new_tokens.
NEVER = -1


def state_bytes(params) -> int:
  return sum(leaf.nbytes for leaf in jax.tree.leaves(params))


def make_cached_eval_step(graphdef):
  """eval_step(params, batch) -> loss of the second half of each window, its first half read
  from the KV cache."""

  @jax.jit
  def eval_step(params, batch):
    model = nnx.merge(graphdef, params)
    b, t = batch['inputs'].shape
    _, caches = model.decode(batch['inputs'][:, :t // 2], model.init_cache(b, t), 0)
    logits_btv, _ = model.decode(batch['inputs'][:, t // 2:], caches, t // 2)
    return cross_entropy(logits_btv, batch['targets'][:, t // 2:])

  return eval_step


def kv_cache_table(loaded, prompt_1t, sampling, key):
  rows, runs = {}, {}
  for dtype in ['', *FLAGS.kv_cache_dtypes]:
    model = run_lib.with_kv_cache_dtype(loaded, dtype)
    generate = make_generate(model.graphdef, sampling, end_token=NEVER,
                             n_valid=loaded.tokenizer.n_vocab)
    name = dtype or 'float'
    runs[name] = (lambda generate: lambda: generate(loaded.params, prompt_1t, key)
                  .block_until_ready())(generate)
    config = nnx.merge(model.graphdef, model.params).config
    rows[name] = (run_lib.evaluate(model, make_eval_step=make_cached_eval_step)['loss'],
                  kv_cache_bytes_per_token(config))
  seconds = interleaved_medians(runs, warmup=1, repeats=FLAGS.repeats)
  print('| KV cache | cached val loss | change | bytes per token | decode tokens/s | vs float |')
  print('|---|---|---|---|---|---|')
  for name, (loss, per_token) in rows.items():
    speed, anchor = FLAGS.new_tokens / seconds[name], FLAGS.new_tokens / seconds['float']
    print(f'| {name} | {loss:.4f} | {loss - rows["float"][0]:+.4f} | {per_token:,} | '
          f'{speed:,.0f} | {speed / anchor:.2f}x |')


def main(argv):
  del argv
  loaded = restore(FLAGS.workdir)
  prompt_1t = jnp.asarray([loaded.tokenizer.encode_ordinary(FLAGS.prompt)
                           or [tokenizer_lib.separator_id(loaded.tokenizer)]], jnp.int32)
  sampling = SamplingConfig(max_new_tokens=FLAGS.new_tokens, temperature=0.0)
  key = jax.random.key(0)
  rows, runs = {}, {}
  for spec in ['float', *FLAGS.quantize]:
    model = loaded if spec == 'float' else run_lib.with_quantized_weights(loaded, spec)
    generate = make_generate(model.graphdef, sampling, end_token=NEVER,
                             n_valid=loaded.tokenizer.n_vocab)
    runs[spec] = (lambda generate, params: lambda: generate(params, prompt_1t, key)
                  .block_until_ready())(generate, model.params)
    rows[spec] = {'loss': run_lib.evaluate(model)['loss'], 'bytes': state_bytes(model.params)}
  stats = {}
  if FLAGS.draft:
    draft = restore(FLAGS.draft)
    for gamma in map(int, FLAGS.gamma):
      generate = make_speculative_generate(loaded.graphdef, draft.graphdef, sampling,
                                           gamma=gamma, end_token=NEVER,
                                           n_valid=loaded.tokenizer.n_vocab)
      name = f'speculative gamma={gamma}'
      _, rounds, accepted = generate(loaded.params, draft.params, prompt_1t, key)
      stats[name] = (int(accepted) / (int(rounds) * gamma), FLAGS.new_tokens / int(rounds))
      runs[name] = (lambda generate: lambda: generate(loaded.params, draft.params, prompt_1t,
                                                      key)[0].block_until_ready())(generate)
      rows[name] = {'loss': rows['float']['loss'],
                    'bytes': rows['float']['bytes'] + state_bytes(draft.params)}
  seconds = interleaved_medians(runs, warmup=1, repeats=FLAGS.repeats)
  anchor = FLAGS.new_tokens / seconds['float']
  print(f'{FLAGS.workdir} ({loaded.source}), {FLAGS.new_tokens} greedy tokens after '
        f'{FLAGS.prompt!r}, batch 1, {jax.devices()[0].platform}')
  print('| setting | val loss | change | state bytes | decode tokens/s | vs float | accepted '
        '| tokens per target pass |')
  print('|---|---|---|---|---|---|---|---|')
  for name, row in rows.items():
    speed = FLAGS.new_tokens / seconds[name]
    accepted, per_pass = (f'{stats[name][0]:.0%}', f'{stats[name][1]:.2f}') if name in stats \
        else ('', '')
    print(f'| {name} | {row["loss"]:.4f} | {row["loss"] - rows["float"]["loss"]:+.4f} | '
          f'{row["bytes"] / 1e6:.2f} MB | {speed:,.0f} | {speed / anchor:.2f}x | {accepted} | '
          f'{per_pass} |')
  print()
  kv_cache_table(loaded, prompt_1t, sampling, key)


if __name__ == '__main__':
  app.run(main)
