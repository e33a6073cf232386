r"""Training and decoding speed of our decoder against Hugging Face's PyTorch LLaMA.

  python benchmarks/speed.py                                  # tiny preset, batch 8x128
  python benchmarks/speed.py --model=tiny --set n_layers=8 --batch_size=16 --seq_len=256
  python benchmarks/speed.py --hf=false --peak_flops=989e12   # ours only, MFU of an H100

Measures, in one run on one machine, with random token ids and random weights:
  - train: the jitted step of training/steps.py (forward, loss, backward, clipped AdamW),
    against `LlamaForCausalLM` of the same shape in float32 with torch.optim.AdamW;
  - prefill and decode: `models.generation.make_generate` (greedy, never stopping early)
    against `model.generate(do_sample=False, use_cache=True)`; prefill is a call that makes
    one new token, decode a call that makes --decode_tokens of them (prefill included).
Each time is the median of --repeats calls after a warm-up (compilation, and two steps
for training); ours and HF alternate in three rounds, so a change in the machine's speed
during the run affects both alike.

Prints a header (device, versions, preset, shapes), the FLOPs count and peak used for
MFU, a Markdown table (tokens/s, milliseconds per step / call / new token, MFU of the
training rows) and the ours/HF ratios of tokens/s. The HF rows are skipped, with a note,
when torch or transformers is missing (they are development dependencies) or when the
config is not LLaMA-shaped (rmsnorm, pre-norm, swiglu, rope, no biases, no qk-norm).

MFU = achieved FLOP/s / peak, with training FLOPs per token (PaLM, appendix B, halved
for the causal mask):  6 * N + 6 * n_layers * n_heads * head_dim * seq_len,
where N = models.decoder.param_count minus the tables that are looked up rather than
multiplied (the input embedding unless tied to the head, a learned position table);
norm gains are included (negligible). The peak is --peak_flops, or when that is 0 the
measured FLOP/s of a 2048^3 float32 `jnp.matmul` on the default device.
"""
import functools
import os
import sys

from absl import app, flags

from lmlab.benchmarks.timing import interleaved_medians, median_seconds

flags.DEFINE_string('model', 'tiny', 'Model preset (models/config.py PRESETS).')
flags.DEFINE_multi_string('set', [], 'Override a ModelConfig field: --set n_layers=8.')
flags.DEFINE_integer('batch_size', 8, 'Training sequences per step.')
flags.DEFINE_integer('seq_len', 128, 'Training tokens per sequence.')
flags.DEFINE_integer('repeats', 10, 'Timed calls per measurement (the median is reported).')
flags.DEFINE_integer('decode_batch', 1, 'Rows decoded together.')
flags.DEFINE_integer('prompt_len', 16, 'Random prompt tokens per row.')
flags.DEFINE_integer('decode_tokens', 128, 'New tokens per row.')
flags.DEFINE_float('peak_flops', 0.0, 'Peak FLOP/s for MFU; 0: measure a float32 matmul.')
flags.DEFINE_bool('hf', True, 'Also time Hugging Face LlamaForCausalLM (PyTorch, CPU).')

FLAGS = flags.FLAGS
LLAMA_SHAPE = dict(norm='rmsnorm', norm_placement='pre', mlp='swiglu', position='rope',
                   use_bias=False, qkv_bias=False, qk_norm=False, parallel_block=False,
                   attention_scale='inv_sqrt_d')


def measured_matmul_flops(n: int = 2048) -> float:
  import jax
  import jax.numpy as jnp
  a_nn = jax.random.normal(jax.random.key(0), (n, n), jnp.float32)
  matmul = jax.jit(jnp.matmul)
  seconds = median_seconds(lambda: matmul(a_nn, a_nn).block_until_ready(), warmup=1, repeats=5)
  return 2 * n ** 3 / seconds


def train_flops_per_token(config, seq_len: int):
  """(FLOPs per trained token, N the parameters used in matmuls); see the docstring."""
  from lmlab.models.registry import param_count
  lookup_tables = ((0 if config.tie_embeddings else config.vocab_size * config.d_model) +
                   (config.max_seq_len * config.d_model if config.position == 'learned' else 0))
  n_matmul = param_count(config) - lookup_tables
  attention = 6 * config.n_layers * config.n_heads * config.resolved_head_dim * seq_len
  return 6 * n_matmul + attention, n_matmul


def our_runs(config, tokens_bt1, prompt_bt, n_new: int) -> dict:
  """Blocking callables: one train step, a prefill call and a decode call (see the docstring)."""
  import jax
  import jax.numpy as jnp
  from flax import nnx
  from lmlab.models.decoder import DecoderLM
  from lmlab.models.generation import SamplingConfig, make_generate
  from lmlab.training.optimizer import OptimizerConfig, make_optimizer, schedule
  from lmlab.training.steps import make_train_step

  graphdef, params = nnx.split(DecoderLM(config, rngs=nnx.Rngs(params=0)))
  opt_config = OptimizerConfig().resolved(steps=1000, family='decoder')
  optimizer = make_optimizer(opt_config)
  train_step = make_train_step(graphdef, optimizer, schedule(opt_config), seed=0,
                               use_dropout=config.dropout_rate > 0)
  batch = {'inputs': jnp.asarray(tokens_bt1[None, :, :-1]),  # One micro-batch: [1, B, T].
           'targets': jnp.asarray(tokens_bt1[None, :, 1:])}
  # The train step donates params and opt_state: everything reads the latest ones here.
  state = {'params': params, 'opt_state': optimizer.init(params), 'step': 0}

  def train_once():
    state['params'], state['opt_state'], _ = jax.block_until_ready(train_step(
        state['params'], state['opt_state'], batch, state['step']))
    state['step'] += 1

  prompt_bt, key = jnp.asarray(prompt_bt), jax.random.key(0)
  runs = {}
  for name, max_new in (('prefill', 1), ('decode', n_new)):
    generate = make_generate(graphdef, SamplingConfig(max_new_tokens=max_new, temperature=0.0),
                             end_token=config.vocab_size, n_valid=config.vocab_size)
    runs[name] = functools.partial(
        lambda g: g(state['params'], prompt_bt, key).block_until_ready(), generate)
  runs['train'] = train_once
  return runs


def hf_runs(config, tokens_bt1, prompt_bt, n_new: int):
  """(the same three callables, versions) for transformers' LlamaForCausalLM, float32."""
  import torch
  import transformers
  from lmlab.training.optimizer import OptimizerConfig
  transformers.logging.set_verbosity_error()
  torch.set_num_threads(os.cpu_count())
  torch.manual_seed(0)
  hf_config = transformers.LlamaConfig(
      vocab_size=config.vocab_size, hidden_size=config.d_model,
      num_hidden_layers=config.n_layers, num_attention_heads=config.n_heads,
      num_key_value_heads=config.n_kv_heads, head_dim=config.resolved_head_dim,
      intermediate_size=config.ffn_dim, rope_theta=config.rope_theta,
      rms_norm_eps=config.norm_eps, tie_word_embeddings=config.tie_embeddings,
      max_position_embeddings=max(config.max_seq_len, tokens_bt1.shape[1],
                                  prompt_bt.shape[1] + n_new),
      pad_token_id=0)
  model = transformers.LlamaForCausalLM(hf_config).float()
  prompt_bt = torch.from_numpy(prompt_bt).long()
  runs = {}

  def generate(max_new):
    model.eval()
    with torch.no_grad():
      model.generate(prompt_bt, attention_mask=torch.ones_like(prompt_bt), do_sample=False,
                     max_new_tokens=max_new, min_new_tokens=max_new, use_cache=True)
  runs['prefill'] = functools.partial(generate, 1)
  runs['decode'] = functools.partial(generate, n_new)

  opt = OptimizerConfig().resolved(steps=1000, family='decoder')
  optimizer = torch.optim.AdamW(model.parameters(), lr=opt.learning_rate, eps=opt.eps,
                                betas=(opt.beta1, opt.beta2), weight_decay=opt.weight_decay)
  tokens_bt1 = torch.from_numpy(tokens_bt1).long()
  inputs_bt, targets_bt = tokens_bt1[:, :-1], tokens_bt1[:, 1:]

  def train_once():
    model.train()
    logits_btv = model(input_ids=inputs_bt).logits
    loss = torch.nn.functional.cross_entropy(logits_btv.flatten(0, 1), targets_bt.flatten())
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), opt.clip_norm)
    optimizer.step()

  runs['train'] = train_once
  return runs, f'torch {torch.__version__}, transformers {transformers.__version__}'


def hf_unavailable(config):
  """Why the HF comparison cannot run, or None."""
  if not FLAGS.hf:
    return 'skipped (--hf=false)'
  try:
    import torch  # noqa: F401
    import transformers  # noqa: F401
  except ImportError as e:
    return f'skipped: torch/transformers not importable ({e}); they are development dependencies'
  mismatched = [f'{name}={getattr(config, name)!r}' for name, want in LLAMA_SHAPE.items()
                if getattr(config, name) != want]
  if mismatched:
    return (f'skipped: not a LLaMA shape ({", ".join(mismatched)}); '
            'LlamaForCausalLM cannot express it')
  return None


def rows_of(who: str, seconds: dict, *, tokens_per_step: int, prompt_tokens: int,
            n_new: int, decode_batch: int, flops_per_token: float, peak: float):
  """Markdown rows: (name, tokens/s, ms, MFU) for train, prefill and decode."""
  train_tps = tokens_per_step / seconds['train']
  return {
      'train': (f'{who} train (ms/step)', train_tps, 1e3 * seconds['train'],
                f'{100 * train_tps * flops_per_token / peak:.1f}%'),
      'prefill': (f'{who} prefill (ms/call)', prompt_tokens / seconds['prefill'],
                  1e3 * seconds['prefill'], '—'),
      'decode': (f'{who} decode (ms/new token)', decode_batch * n_new / seconds['decode'],
                 1e3 * seconds['decode'] / n_new, '—'),
  }


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'unexpected arguments: {" ".join(argv[1:])}')
  import jax
  import numpy as np
  from lmlab.data.tokenizer import byte_tokenizer
  from lmlab.models import config as config_lib
  from lmlab.training.language_modeling import resolve_vocab
  try:
    config = config_lib.with_overrides(config_lib.preset(FLAGS.model), FLAGS.set).validate()
    config = resolve_vocab(config, byte_tokenizer())  # A preset that takes its tokenizer's.
  except config_lib.ConfigError as e:
    print(f'error: {e}', file=sys.stderr)
    sys.exit(1)

  rng = np.random.default_rng(0)
  tokens_bt1 = rng.integers(0, config.vocab_size, (FLAGS.batch_size, FLAGS.seq_len + 1),
                            np.int32)  # Inputs [:, :-1], targets [:, 1:].
  prompt_bt = rng.integers(0, config.vocab_size, (FLAGS.decode_batch, FLAGS.prompt_len), np.int32)
  run_args = (config, tokens_bt1, prompt_bt, FLAGS.decode_tokens)
  flops_per_token, n_matmul = train_flops_per_token(config, FLAGS.seq_len)
  peak = FLAGS.peak_flops or measured_matmul_flops()
  row_args = dict(tokens_per_step=FLAGS.batch_size * FLAGS.seq_len,
                  prompt_tokens=FLAGS.decode_batch * FLAGS.prompt_len,
                  n_new=FLAGS.decode_tokens, decode_batch=FLAGS.decode_batch,
                  flops_per_token=flops_per_token, peak=peak)

  runs = {'ours': our_runs(*run_args)}
  hf_note, hf = hf_unavailable(config), {}
  if hf_note is None:
    runs['HF'], hf_note = hf_runs(*run_args)
  seconds = {who: {} for who in runs}
  for kind in ('train', 'prefill', 'decode'):
    medians = interleaved_medians({who: runs[who][kind] for who in runs},
                                  warmup=3 if kind == 'train' else 1, repeats=FLAGS.repeats)
    for who, median in medians.items():
      seconds[who][kind] = median
  ours = rows_of('ours', seconds['ours'], **row_args)
  if 'HF' in seconds:
    hf = rows_of('HF', seconds['HF'], **row_args)

  overrides = ''.join(f' --set {s}' for s in FLAGS.set)
  print(f'device {jax.devices()} | JAX {jax.__version__} | HF: {hf_note} | '
        f'--model={FLAGS.model}{overrides} | train batch {FLAGS.batch_size}x{FLAGS.seq_len} | '
        f'decode batch {FLAGS.decode_batch}, prompt {FLAGS.prompt_len}, '
        f'+{FLAGS.decode_tokens} tokens | median of {FLAGS.repeats}')
  print(f'train FLOPs/token = 6*N + 6*L*H*Dh*T = {flops_per_token / 1e6:.2f} MFLOP '
        f'(N={n_matmul:,} matmul params); peak {peak / 1e9:.1f} GFLOP/s '
        f'({"--peak_flops" if FLAGS.peak_flops else "measured 2048^3 float32 jnp.matmul"})\n')
  print('| run | tokens/s | ms | MFU |\n|---|---:|---:|---:|')
  for kind in ('train', 'prefill', 'decode'):
    for table in (ours, hf):
      if kind in table:
        name, tokens_per_s, ms, mfu = table[kind]
        print(f'| {name} | {tokens_per_s:,.0f} | {ms:.2f} | {mfu} |')
  if hf:
    print('\nours/HF tokens/s: ' + ', '.join(f'{kind} {ours[kind][1] / hf[kind][1]:.2f}x'
                                             for kind in ('train', 'prefill', 'decode')))


if __name__ == '__main__':
  app.run(main)
