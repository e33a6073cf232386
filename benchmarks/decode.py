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
share of drafted tokens the target accepted, tokens per target forward pass, and the
speed-up Leviathan et al. (2023) predict from them: tokens per pass / (gamma c + 1), with c
the draft's decoding time over the target's (the 'draft alone' row); and the same with the
target's pass over gamma + 1 tokens charged at its measured cost r (a jitted loop of 40
passes) in place of one step's: tokens per pass / (gamma c + r).

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
# Target passes per timed loop.
PASSES = 40


def state_bytes(params) -> int:
  return sum(leaf.nbytes for leaf in jax.tree.leaves(params))


def greedy_decoding(model, prompt_1t, sampling, key):
  """A function that decodes from `model` (a Loaded) and waits for the tokens."""
  generate = make_generate(model.graphdef, sampling, end_token=NEVER,
                           n_valid=model.tokenizer.n_vocab)
  return lambda: generate(model.params, prompt_1t, key).block_until_ready()


def target_passes(model, tokens: int):
  """A function that runs PASSES forward passes of `model` over `tokens` tokens each
  against its KV cache, in one jitted loop (each pass's input is the last one's argmax, so
  that nothing can be hoisted out of the loop), and waits for them."""

  @jax.jit
  def run(params):
    decoder = nnx.merge(model.graphdef, params)

    def one_pass(carry, _):
      tokens_1t, caches = carry
      logits_1tv, caches = decoder.decode(tokens_1t, caches, 0)
      return (jnp.argmax(logits_1tv, axis=-1).astype(jnp.int32), caches), None

    start = (jnp.zeros((1, tokens), jnp.int32), decoder.init_cache(1, tokens))
    return jax.lax.scan(one_pass, start, None, length=PASSES)[0]

  return lambda: jax.block_until_ready(run(model.params))


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
    name = dtype or 'float'
    runs[name] = greedy_decoding(model, prompt_1t, sampling, key)
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
    runs[spec] = greedy_decoding(model, prompt_1t, sampling, key)
    rows[spec] = {'loss': run_lib.evaluate(model)['loss'], 'bytes': state_bytes(model.params)}
  stats = {}
  if FLAGS.draft:
    draft = restore(FLAGS.draft)
    runs['draft alone'] = greedy_decoding(draft, prompt_1t, sampling, key)
    rows['draft alone'] = {'loss': run_lib.evaluate(draft)['loss'],
                           'bytes': state_bytes(draft.params)}
    for tokens in sorted({1, *(int(gamma) + 1 for gamma in FLAGS.gamma)}):
      runs[f'target pass of {tokens}'] = target_passes(loaded, tokens)
    for gamma in map(int, FLAGS.gamma):
      generate = make_speculative_generate(loaded.graphdef, draft.graphdef, sampling,
                                           gamma=gamma, end_token=NEVER,
                                           n_valid=loaded.tokenizer.n_vocab)
      name = f'speculative gamma={gamma}'
      _, rounds, accepted = generate(loaded.params, draft.params, prompt_1t, key)
      stats[name] = (gamma, int(accepted) / (int(rounds) * gamma),
                     FLAGS.new_tokens / int(rounds))
      runs[name] = (lambda generate: lambda: generate(loaded.params, draft.params, prompt_1t,
                                                      key)[0].block_until_ready())(generate)
      rows[name] = {'loss': rows['float']['loss'],
                    'bytes': rows['float']['bytes'] + state_bytes(draft.params)}
  seconds = interleaved_medians(runs, warmup=1, repeats=FLAGS.repeats)
  anchor = FLAGS.new_tokens / seconds['float']
  print(f'{FLAGS.workdir} ({loaded.source}), {FLAGS.new_tokens} greedy tokens after '
        f'{FLAGS.prompt!r}, batch 1, {jax.devices()[0].platform}')
  print('| setting | val loss | change | state bytes | decode tokens/s | vs float | accepted '
        '| tokens per target pass | predicted | predicted, pass cost measured |')
  print('|---|---|---|---|---|---|---|---|---|---|')
  for name, row in rows.items():
    speed = FLAGS.new_tokens / seconds[name]
    speculative = ['', '', '', '']
    if name in stats:
      gamma, accepted, per_pass = stats[name]
      # Leviathan et al.'s cost model: a round costs gamma draft steps and one target step;
      # the second prediction charges the target's pass over gamma + 1 tokens as timed.
      draft_cost = gamma * seconds['draft alone'] / seconds['float']
      pass_cost = seconds[f'target pass of {gamma + 1}'] / seconds['target pass of 1']
      speculative = [f'{accepted:.0%}', f'{per_pass:.2f}',
                     f'{per_pass / (draft_cost + 1):.2f}x',
                     f'{per_pass / (draft_cost + pass_cost):.2f}x']
    print(f'| {name} | {row["loss"]:.4f} | {row["loss"] - rows["float"]["loss"]:+.4f} | '
          f'{row["bytes"] / 1e6:.2f} MB | {speed:,.0f} | {speed / anchor:.2f}x | '
          f'{" | ".join(speculative)} |')
  if FLAGS.draft:
    print('\nThe target\'s forward pass against its cache, in a jitted loop:')
    print(', '.join(f'{name[len("target pass of "):]} tokens {seconds[name] / PASSES * 1e3:.3f} ms'
                    for name in seconds if name.startswith('target pass of ')))
  print()
  kv_cache_table(loaded, prompt_1t, sampling, key)


if __name__ == '__main__':
  app.run(main)
