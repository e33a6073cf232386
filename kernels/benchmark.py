"""Attention speed: forward and forward+backward time and TFLOP/s per implementation.

Run from the repository root:

  python -m lmlab.kernels.benchmark                      # this backend's defaults
  python -m lmlab.kernels.benchmark --impls=pallas,xla,cudnn --seq_lens=2048,4096,8192,16384 \
      --tokens=16384 --heads=16 --head_dim=128 --dtypes=bfloat16 --causal=true,false

Defaults follow the backend: on GPU pallas, xla and cudnn at S = 2k-16k with B*S = 16k
tokens, 16 heads of 128, bfloat16 (the FlashAttention papers' setting); on TPU the same
without cudnn; on CPU chunked and xla on short float32 sequences, which take seconds.
--features adds ALiBi ('alibi') or a sliding window ('window', of --window keys) to the
causal rows, to measure what they cost.

Each configuration is jitted and warmed up, then timed over --reps calls, each on freshly
drawn inputs (drawn before the clock starts), waiting with block_until_ready; the table
shows medians. FLOPs are the FlashAttention papers' count: forward 4*B*S^2*H*D, halved
when causal; backward 2.5x the forward. The backward column is (fwd+bwd) - fwd.
"""
import statistics
import time

import jax
import jax.numpy as jnp
from absl import app, flags

from lmlab.kernels import attention as attention_lib

_BACKEND_DEFAULTS = {
    'gpu': dict(impls='pallas,xla,cudnn', seq_lens='2048,4096,8192,16384', tokens=16384,
                heads=16, head_dim=128, dtypes='bfloat16', reps=20),
    'tpu': dict(impls='pallas,xla', seq_lens='2048,4096,8192,16384', tokens=16384, heads=16,
                head_dim=128, dtypes='bfloat16', reps=20),
    'cpu': dict(impls='chunked,xla', seq_lens='256,512', tokens=512, heads=4, head_dim=64,
                dtypes='float32', reps=5),
}

FLAGS = flags.FLAGS
flags.DEFINE_list('impls', None, 'Implementations (default: by backend, see above).')
flags.DEFINE_list('seq_lens', None, 'Sequence lengths S (= T).')
flags.DEFINE_integer('tokens', None, 'Tokens per batch; batch = max(1, tokens // S).')
flags.DEFINE_integer('heads', None, 'Query heads.')
flags.DEFINE_integer('kv_heads', 0, 'Key/value heads (0: as many as query heads).')
flags.DEFINE_integer('head_dim', None, 'Head dimension.')
flags.DEFINE_list('causal', ['true', 'false'], 'Causal settings to time.')
flags.DEFINE_list('dtypes', None, 'Input dtypes.')
flags.DEFINE_list('features', ['plain'], "Mask extras: 'plain', 'alibi', 'window'.")
flags.DEFINE_integer('window', 256, "Sliding window for feature 'window'.")
flags.DEFINE_list('modes', ['fwd', 'fwd_bwd'], "What to time: 'fwd', 'fwd_bwd'.")
flags.DEFINE_integer('reps', None, 'Timed calls per configuration.')
flags.DEFINE_integer('warmup', 2, 'Untimed calls per configuration after compiling.')
flags.DEFINE_integer('seed', 0, 'Seed of the random inputs.')


def _median_seconds(fn, make_inputs, reps: int, warmup: int) -> float:
  for i in range(warmup):
    jax.block_until_ready(fn(*make_inputs(i)))
  times = []
  for i in range(warmup, warmup + reps):
    inputs = jax.block_until_ready(make_inputs(i))
    start = time.perf_counter()
    jax.block_until_ready(fn(*inputs))
    times.append(time.perf_counter() - start)
  return statistics.median(times)


def _benchmark(impl, *, batch, seq, heads, kv_heads, head_dim, causal, dtype, feature):
  """{mode: median seconds} for one configuration.

  Raises ValueError where impl does not take the request, JaxRuntimeError where it fails
  (as xla runs out of memory at long S).
  """
  mask = dict(causal=causal)
  if feature == 'alibi':
    mask['alibi_slopes'] = 2.0 ** -jnp.arange(1, heads + 1, dtype=jnp.float32)
  elif feature == 'window':
    mask['sliding_window'] = FLAGS.window

  def attend(q, k, v):
    return attention_lib.attention(q, k, v, impl=impl, **mask)

  def fwd_bwd(q, k, v, d_out):
    out, pullback = jax.vjp(attend, q, k, v)
    return out, pullback(d_out)

  @jax.jit
  def make_inputs(i):
    keys = jax.random.split(jax.random.fold_in(jax.random.key(FLAGS.seed), i), 4)
    q = jax.random.normal(keys[0], (batch, seq, heads, head_dim), dtype)
    k = jax.random.normal(keys[1], (batch, seq, kv_heads, head_dim), dtype)
    v = jax.random.normal(keys[2], (batch, seq, kv_heads, head_dim), dtype)
    return q, k, v, jax.random.normal(keys[3], q.shape, dtype)

  functions = dict(fwd=(jax.jit(attend), lambda i: make_inputs(i)[:3]),
                   fwd_bwd=(jax.jit(fwd_bwd), make_inputs))
  seconds = {}
  for mode in FLAGS.modes:
    fn, inputs = functions[mode]
    fn.trace(*inputs(0)).lower()  # Unsupported requests raise ValueError here, untimed.
    seconds[mode] = _median_seconds(fn, inputs, FLAGS.reps, FLAGS.warmup)
  return seconds


def _row_cells(seconds, forward_flops):
  cells = []
  fwd, both = seconds.get('fwd'), seconds.get('fwd_bwd')
  for time_s, flops in ((fwd, forward_flops), (both, 3.5 * forward_flops),
                        (both - fwd if fwd and both else None, 2.5 * forward_flops)):
    cells += ['' if time_s is None else f'{time_s * 1e3:.2f}',
              '' if time_s is None or time_s <= 0 else f'{flops / time_s / 1e12:.3g}']
  return cells


def main(argv):
  del argv
  defaults = _BACKEND_DEFAULTS.get(jax.default_backend(), _BACKEND_DEFAULTS['gpu'])
  option = lambda name: defaults[name] if getattr(FLAGS, name) is None else getattr(FLAGS, name)
  as_list = lambda value: value.split(',') if isinstance(value, str) else value
  impls, seq_lens, dtypes = (as_list(option(name)) for name in ('impls', 'seq_lens', 'dtypes'))
  heads, head_dim = option('heads'), option('head_dim')
  FLAGS.reps = option('reps')
  kv_heads = FLAGS.kv_heads or heads
  print(f'# {jax.devices()[0].device_kind} ({jax.default_backend()}), JAX {jax.__version__}, '
        f'{heads} query / {kv_heads} KV heads of {head_dim}, median of {FLAGS.reps}')
  print('| impl | dtype | causal | mask | B | S | fwd ms | fwd TFLOP/s | fwd+bwd ms '
        '| fwd+bwd TFLOP/s | bwd ms | bwd TFLOP/s |')
  print('|---' * 12 + '|')
  for dtype in dtypes:
    for causal in (value.lower() in ('true', '1', 'yes') for value in FLAGS.causal):
      for feature in FLAGS.features:
        for seq in map(int, seq_lens):
          batch = max(1, option('tokens') // seq)
          forward_flops = 4 * batch * seq * seq * heads * head_dim / (2 if causal else 1)
          for impl in impls:
            prefix = [impl, dtype, str(causal), feature, str(batch), str(seq)]
            try:
              seconds = _benchmark(impl, batch=batch, seq=seq, heads=heads, kv_heads=kv_heads,
                                   head_dim=head_dim, causal=causal, dtype=jnp.dtype(dtype),
                                   feature=feature)
            except (ValueError, jax.errors.JaxRuntimeError) as error:  # Unsupported; or OOM.
              reason = str(error).splitlines()[0][:200]
              print('| ' + ' | '.join(prefix + [f'n/a: {reason}'] + [''] * 5) + ' |', flush=True)
              continue
            print('| ' + ' | '.join(prefix + _row_cells(seconds, forward_flops)) + ' |',
                  flush=True)


if __name__ == '__main__':
  app.run(main)
