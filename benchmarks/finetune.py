r"""What fine-tuning costs: full fine-tuning beside each PEFT method, in one run.

  python benchmarks/finetune.py               # d512, 4 layers, LLaMA-shaped: timed steps
  python benchmarks/finetune.py --model=qwen2-0.5b --set= --shape_only --batch_size=4 \
      --seq_len=512                           # the preset as it is (--set= clears the default)

For each method (full: every parameter trains; lora: rank --lora_rank on --lora_targets;
qlora: the same with those layers' frozen kernels stored in NF4 or int8, models/quantize.py),
reports the parameters that train (count, and share of the float model's), the bytes that
all the parameters take (quantised codes and scales included), the optimizer state (AdamW's
two moments of those parameters), the compiled train step's peak and temporary memory on one
device as XLA reports it, and, unless --shape_only, the median step time of the jitted step
of training/steps.py on random tokens (the methods alternate, so the machine's drift hits
both alike). --shape_only compiles against shapes alone (jax.eval_shape), allocating no
weights, so a model larger than this machine's memory can be sized.
"""
import dataclasses

from absl import app, flags

from lmlab.benchmarks.timing import interleaved_medians

flags.DEFINE_string('model', 'tiny', 'Model preset (models/config.py PRESETS).')
flags.DEFINE_multi_string('set', ['d_model=512', 'n_layers=4', 'n_heads=8', 'n_kv_heads=8',
                                  'ffn_dim=1376', 'vocab_size=32000'],
                          'Override a ModelConfig field (default: the d512/4-layer LLaMA '
                          'shape of issue 17).')
flags.DEFINE_integer('batch_size', 8, 'Sequences per step.')
flags.DEFINE_integer('seq_len', 128, 'Tokens per sequence.')
flags.DEFINE_integer('lora_rank', 8, 'LoRA rank.')
flags.DEFINE_string('lora_targets', 'q,k,v,o,gate,up,down', 'LoRA targets.')
flags.DEFINE_integer('repeats', 9, 'Timed steps per method (the median is reported).')
flags.DEFINE_bool('shape_only', False, 'Compile from shapes only: memory, no timing.')

FLAGS = flags.FLAGS


def method_configs(base) -> dict:
  lora = lambda quantize: dataclasses.replace(
      base, peft='lora', lora_rank=FLAGS.lora_rank, lora_alpha=2.0 * FLAGS.lora_rank,
      lora_targets=FLAGS.lora_targets, lora_quantize=quantize).validate()
  return {'full': base, f'lora r={FLAGS.lora_rank}': lora(''),
          f'qlora nf4 r={FLAGS.lora_rank}': lora('nf4'),
          f'qlora int8 r={FLAGS.lora_rank}': lora('int8')}


def compiled_step(config):
  """(the compiled train step, its abstract or real inputs, the trainable filter)."""
  import jax
  import jax.numpy as jnp
  from flax import nnx
  from lmlab.models.registry import build, trainable
  from lmlab.training.optimizer import OptimizerConfig, make_optimizer, schedule
  from lmlab.training.steps import make_train_step, trainable_part

  def new_params():
    return nnx.split(build(config, rngs=nnx.Rngs(params=0)))[1]

  graphdef = nnx.graphdef(nnx.eval_shape(lambda: build(config, rngs=nnx.Rngs(0))))
  opt_config = OptimizerConfig().resolved(steps=1000, family='decoder')
  optimizer = make_optimizer(opt_config)
  init_opt_state = lambda params: optimizer.init(trainable_part(params, trainable(config)))
  step = make_train_step(graphdef, optimizer, schedule(opt_config), seed=0, use_dropout=False,
                         trainable=trainable(config))
  tokens = jax.ShapeDtypeStruct((1, FLAGS.batch_size, FLAGS.seq_len), jnp.int32)
  batch = {'inputs': tokens, 'targets': tokens}
  params = jax.eval_shape(new_params) if FLAGS.shape_only else jax.jit(new_params)()
  opt_state = (jax.eval_shape(init_opt_state, params) if FLAGS.shape_only
               else jax.jit(init_opt_state)(params))
  compiled = step.lower(params, opt_state, batch, jnp.int32(0)).compile()
  return compiled, params, opt_state, trainable(config)


def describe(name, config, compiled, params, opt_state, trainable_filter) -> dict:
  import jax
  from lmlab.models.registry import param_count
  from lmlab.training.steps import trainable_part
  count = lambda tree: sum(leaf.size for leaf in jax.tree.leaves(tree))
  nbytes = lambda tree: sum(leaf.size * leaf.dtype.itemsize for leaf in jax.tree.leaves(tree))
  trained = count(trainable_part(params, trainable_filter))
  memory = compiled.memory_analysis()
  return {'method': name, 'trainable': trained,
          'share': trained / param_count(config),
          'params_mib': nbytes(params) / 2**20, 'opt_state_mib': nbytes(opt_state) / 2**20,
          'peak_mib': getattr(memory, 'peak_memory_in_bytes', 0) / 2**20,
          'temp_mib': memory.temp_size_in_bytes / 2**20}


def main(argv):
  del argv
  import jax
  import numpy as np
  from lmlab.models.config import preset, with_overrides

  overrides = [assignment for assignment in FLAGS.set if assignment]
  base = with_overrides(preset(FLAGS.model), overrides).validate()
  print(f'{FLAGS.model} {", ".join(overrides)}; batch {FLAGS.batch_size}x{FLAGS.seq_len}; '
        f'{jax.devices()[0].device_kind}, JAX {jax.__version__}')
  rows, runs = [], {}
  tokens = np.random.default_rng(0).integers(0, base.vocab_size,
                                             (1, FLAGS.batch_size, FLAGS.seq_len), np.int32)
  for name, config in method_configs(base).items():
    compiled, params, opt_state, trainable_filter = compiled_step(config)
    rows.append(describe(name, config, compiled, params, opt_state, trainable_filter))
    if not FLAGS.shape_only:
      state = {'params': params, 'opt_state': opt_state, 'step': 0}
      batch = {'inputs': tokens, 'targets': tokens}

      def once(compiled=compiled, state=state, batch=batch):
        state['params'], state['opt_state'], _ = jax.block_until_ready(compiled(
            state['params'], state['opt_state'], batch, np.int32(state['step'])))
        state['step'] += 1

      runs[name] = once
  seconds = ({} if FLAGS.shape_only else
             interleaved_medians(runs, warmup=2, repeats=FLAGS.repeats))
  print('\n| method | trainable params | share | params MiB | optimizer state MiB | '
        'step peak MiB | step temporaries MiB | ms / step |')
  print('|---|---:|---:|---:|---:|---:|---:|---:|')
  for row in rows:
    time_ms = f'{seconds[row["method"]] * 1e3:.1f}' if seconds else '-'
    print(f'| {row["method"]} | {row["trainable"]:,} | {row["share"]:.2%} | '
          f'{row["params_mib"]:.1f} | {row["opt_state_mib"]:.1f} | {row["peak_mib"]:.1f} | '
          f'{row["temp_mib"]:.1f} | {time_ms} |')


if __name__ == '__main__':
  app.run(main)
