r"""Several samples of one prompt: its KV cache held once and shared (models/shared_prefix.py)
against the prompt copied once per sample, the way a batch of n equal prompts runs.

  python main.py --workdir=runs/tiny               # the model, about 4 minutes
  python benchmarks/shared_prefix.py --workdir=runs/tiny

The prompt is the first --prompt_tokens tokens of this file. For each n of --num_samples, two
rows: 'copied' (make_generate on the prompt repeated n times: n prefills, n caches of the
prompt) and 'shared' (one prefill, one cache of the prompt that all n samples read).
Columns: the KV cache the decoding loop carries (models/cache_size.py's bytes per token
times its positions: n (P + S) copied, P + n S shared), the compiled function's memory
(XLA's memory_analysis: arguments + temporaries + outputs - aliased), and new tokens per
second over all samples (temperature 1, --new_tokens each, the median of --repeats runs).
"""
import jax
import jax.numpy as jnp
from absl import app, flags
from flax import nnx

from lmlab.benchmarks.timing import interleaved_medians
from lmlab.models.cache_size import kv_cache_bytes_per_token
from lmlab.models.generation import SamplingConfig, make_generate
from lmlab.training.memory import compiled_bytes
from lmlab.training.restored import restore

flags.DEFINE_string('workdir', 'runs/tiny', 'The trained run to sample from.')
flags.DEFINE_list('num_samples', ['4', '16'], 'Samples of the prompt, one pair of rows each.')
flags.DEFINE_integer('prompt_tokens', 192, 'Prompt length P (the start of this file).')
flags.DEFINE_integer('new_tokens', 64, 'Tokens S sampled per sample.')
flags.DEFINE_integer('repeats', 6, 'Timed runs per row (the median is reported).')

FLAGS = flags.FLAGS
# A token id no vocabulary has: every sample runs to new_tokens.
NEVER = -1


def main(argv):
  del argv
  loaded = restore(FLAGS.workdir)
  with open(__file__, encoding='utf-8') as source:
    prompt = loaded.tokenizer.encode_ordinary(source.read())[:FLAGS.prompt_tokens]
  prompt_1t, p, s = jnp.asarray([prompt], jnp.int32), len(prompt), FLAGS.new_tokens
  sampling = SamplingConfig(max_new_tokens=s, temperature=1.0)
  key = jax.random.key(0)
  per_token = kv_cache_bytes_per_token(
      nnx.merge(loaded.graphdef, loaded.params).config)
  rows, runs = {}, {}
  for n in map(int, FLAGS.num_samples):
    for way, samples, prompt_bt, positions in [('copied', 1, jnp.repeat(prompt_1t, n, 0),
                                                n * (p + s)),
                                               ('shared', n, prompt_1t, p + n * s)]:
      generate = make_generate(loaded.graphdef, sampling, end_token=NEVER,
                               n_valid=loaded.tokenizer.n_vocab, num_samples=samples)
      name = f'n={n} {way}'
      rows[name] = (n, positions * per_token, compiled_bytes(
          generate.lower(loaded.params, prompt_bt, key).compile()))
      runs[name] = (lambda generate, prompt_bt: lambda: generate(
          loaded.params, prompt_bt, key).block_until_ready())(generate, prompt_bt)
  seconds = interleaved_medians(runs, warmup=1, repeats=FLAGS.repeats)
  print(f'{FLAGS.workdir} ({loaded.source}), prompt of {p} tokens, {s} new tokens per sample, '
        f'{jax.devices()[0].platform}')
  print('| samples | prompt | KV cache | compiled memory | new tokens/s |')
  print('|---|---|---|---|---|')
  for name, (n, cache, memory) in rows.items():
    print(f'| {n} | {name.split()[1]} | {cache / 1e6:.2f} MB | {memory / 1e6:.2f} MB | '
          f'{n * s / seconds[name]:,.0f} |')


if __name__ == '__main__':
  app.run(main)
