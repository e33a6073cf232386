"""lmlab: train, evaluate and sample from transformer language models.

  python main.py                       # train the tiny default on the Python stdlib, ~3 min on CPU
  python main.py --mode=eval --workdir=runs/tiny
  python main.py --mode=generate --workdir=runs/tiny --prompt='def '
  python main.py --model=tiny --set norm_placement=post --set mlp=gelu --workdir=runs/post

Any ModelConfig field can be overridden with --set field=value (repeatable); the resolved
config is written to <workdir>/config.json. Re-running a train command in the same workdir
resumes from its latest checkpoint.
"""
import dataclasses
import math
import os
import sys

from absl import app, flags, logging

MODES = ('train', 'eval', 'generate', 'tokenizer')

flags.DEFINE_enum('mode', 'train', MODES, 'What to do.')
flags.DEFINE_string('model', 'tiny', 'Model preset (models/config.py PRESETS).')
flags.DEFINE_multi_string('set', [], 'Override a ModelConfig field: --set n_layers=8.')
flags.DEFINE_string('workdir', None, 'Run folder (config, metrics, checkpoints, token cache); '
                    'default runs/<model>.')
flags.DEFINE_integer('steps', 500, 'Training steps (optimizer updates).')
flags.DEFINE_integer('batch_size', 32, 'Sequences per step (split over --grad_accum).')
flags.DEFINE_integer('seq_len', 128, 'Tokens per sequence.')
flags.DEFINE_integer('grad_accum', 1, 'Micro-batches whose gradients make one update.')
flags.DEFINE_float('learning_rate', 3e-3, 'Peak learning rate.')
flags.DEFINE_integer('warmup_steps', 50, 'Linear warmup steps.')
flags.DEFINE_integer('schedule_steps', 0, 'Length of the cosine schedule; 0: --steps.')
flags.DEFINE_float('weight_decay', 0.1, 'AdamW weight decay (matrices only).')
flags.DEFINE_float('clip_norm', 1.0, 'Global gradient-norm clip.')
flags.DEFINE_integer('seed', 0, 'Seed of initialisation, batches and dropout.')
flags.DEFINE_string('data', None, 'A text file, directory or glob; default: the Python '
                    'standard library of this interpreter.')
flags.DEFINE_float('val_fraction', 0.05, 'Share of files (or of a single file) held out.')
flags.DEFINE_string('tokenizer', 'bytes', 'bytes | bpe:<size>[:gpt2|:cl100k][:digits] | '
                    'wordpiece:<size> | a .tiktoken, tokenizer.json or vocab.txt file '
                    '(data/tokenizer.py).')
flags.DEFINE_string('tokenizer_pattern', None, 'Pre-tokenisation (gpt2, cl100k or a regex) '
                    'of a .tiktoken file that has no .json beside it.')
flags.DEFINE_string('tokenizer_sha256', None, 'Expected sha256 of a .tiktoken --tokenizer file.')
flags.DEFINE_string('tokenizer_out', None, '--mode=tokenizer: where to write the vocabulary.')
flags.DEFINE_bool('document_masking', True, 'Keep packed documents from attending to each '
                  'other (segment ids at end-of-text tokens).')
flags.DEFINE_integer('eval_every', 100, 'Evaluate every N steps.')
flags.DEFINE_integer('eval_batches', 16, 'Validation batches per evaluation.')
flags.DEFINE_integer('save_every', 100, 'Checkpoint every N steps.')
flags.DEFINE_integer('keep_checkpoints', 3, 'Checkpoints kept.')
flags.DEFINE_integer('log_every', 10, 'Log a metrics line every N steps.')
flags.DEFINE_string('prompt', '', 'Prompt for generation (empty: start of a document).')
flags.DEFINE_integer('max_new_tokens', 200, 'Tokens to generate.')
flags.DEFINE_float('temperature', 0.8, 'Sampling temperature; 0 is greedy.')
flags.DEFINE_integer('top_k', 0, 'Sample among the k likeliest tokens; 0: all.')
flags.DEFINE_float('top_p', 1.0, 'Nucleus sampling mass; 1: off.')
flags.DEFINE_float('repetition_penalty', 1.0, 'Penalty for tokens already present; 1: off.')

FLAGS = flags.FLAGS


def _model_config():
  from models import config as config_lib
  return config_lib.with_overrides(config_lib.preset(FLAGS.model), FLAGS.set).validate()


def _workdir():
  return FLAGS.workdir or os.path.join('runs', FLAGS.model)


def _train_config():
  from training.loop import TrainConfig
  return TrainConfig(
      workdir=_workdir(), steps=FLAGS.steps, batch_size=FLAGS.batch_size, seq_len=FLAGS.seq_len,
      grad_accum=FLAGS.grad_accum, seed=FLAGS.seed, data=FLAGS.data,
      val_fraction=FLAGS.val_fraction, tokenizer=FLAGS.tokenizer,
      tokenizer_pattern=FLAGS.tokenizer_pattern, tokenizer_sha256=FLAGS.tokenizer_sha256,
      document_masking=FLAGS.document_masking, eval_every=FLAGS.eval_every,
      eval_batches=FLAGS.eval_batches, save_every=FLAGS.save_every,
      keep_checkpoints=FLAGS.keep_checkpoints, log_every=FLAGS.log_every)


def _sampling_config():
  from models.generation import SamplingConfig
  return SamplingConfig(max_new_tokens=FLAGS.max_new_tokens, temperature=FLAGS.temperature,
                        top_k=FLAGS.top_k, top_p=FLAGS.top_p,
                        repetition_penalty=FLAGS.repetition_penalty)


def _sample(graphdef, params, tokenizer):
  import jax
  import jax.numpy as jnp
  from data.tokenizer import separator_id
  from models.generation import make_generate
  eot = separator_id(tokenizer)
  prompt = tokenizer.encode_ordinary(FLAGS.prompt) or [eot]
  generate = make_generate(graphdef, _sampling_config(), end_token=eot, n_valid=tokenizer.n_vocab)
  new_tokens = jax.device_get(generate(params, jnp.asarray([prompt], jnp.int32),
                                       jax.random.key(FLAGS.seed)))[0].tolist()
  if eot in new_tokens:
    new_tokens = new_tokens[:new_tokens.index(eot)]
  return FLAGS.prompt + tokenizer.decode(new_tokens, errors='replace')


def _restore(workdir):
  """(graphdef, params, tokenizer, TrainConfig, step) of a workdir's latest checkpoint."""
  import jax
  from flax import nnx
  from models.decoder import DecoderLM
  from training.checkpoint import CheckpointError, Checkpoints
  from training.loop import TrainConfig, load_run_tokenizer
  from training.optimizer import OptimizerConfig, make_optimizer
  from training.workdir import read_config
  resolved = read_config(workdir)
  fields = {f.name for f in dataclasses.fields(TrainConfig)}
  run = TrainConfig(**{k: v for k, v in resolved.items() if k in fields})
  abstract = nnx.eval_shape(lambda: DecoderLM(resolved['model'], rngs=nnx.Rngs(0)))
  graphdef, abstract_params = nnx.split(abstract)
  checkpoints = Checkpoints(workdir)
  step = checkpoints.latest_step()
  if step is None:
    raise CheckpointError(f'no checkpoint in {checkpoints.directory}; train first')
  optimizer = make_optimizer(OptimizerConfig(**resolved['optimizer']))
  abstract_state = {'params': abstract_params,
                    'opt_state': jax.eval_shape(optimizer.init, abstract_params)}
  params = checkpoints.restore_state(step, abstract_state)['params']
  checkpoints.close()
  return graphdef, params, load_run_tokenizer(run), run, step


def train():
  from training.loop import train as train_loop
  from training.optimizer import OptimizerConfig
  model_config = _model_config()
  opt_config = OptimizerConfig(learning_rate=FLAGS.learning_rate,
                               warmup_steps=FLAGS.warmup_steps,
                               total_steps=FLAGS.schedule_steps or FLAGS.steps,
                               weight_decay=FLAGS.weight_decay, clip_norm=FLAGS.clip_norm)
  params, graphdef, tokenizer, summary = train_loop(_train_config(), model_config, opt_config)
  initial = summary['initial_eval_loss']
  print(f'validation loss {summary["eval_loss"]:.4f}, perplexity {summary["eval_ppl"]:.2f} '
        f'after {summary["step"]} steps' +
        (f' (step 0: {initial:.4f})' if initial is not None else ''))
  print('sample:\n' + _sample(graphdef, params, tokenizer))


def evaluate():
  from data import DataError
  from data import batches as batches_lib
  from data import corpus as corpus_lib
  from training.loop import end_token, evaluate as evaluate_tokens, tokenize
  from training.steps import make_eval_step
  graphdef, params, tokenizer, run, step = _restore(_workdir())
  if FLAGS.data:
    _, paths = corpus_lib.files_of(FLAGS.data)
    splits = {'eval': [corpus_lib.Document(p, p) for p in paths if os.path.getsize(p)]}
    if not splits['eval']:
      raise DataError(f'--data={FLAGS.data!r} has no non-empty files')
    tokens = tokenize(run, tokenizer, splits)['eval']
  else:
    tokens = tokenize(run, tokenizer, corpus_lib.split_corpus(run.data, run.val_fraction))['val']
  batches_lib.check_length(tokens, run.seq_len, 'evaluation')
  loss = evaluate_tokens(make_eval_step(graphdef), params, tokens,
                         batch_size=run.micro_batch_size, seq_len=run.seq_len,
                         max_batches=(FLAGS.eval_batches if FLAGS['eval_batches'].present
                                      else run.eval_batches),
                         end_token=end_token(run, tokenizer))
  print(f'checkpoint {step}: loss {loss:.4f}, perplexity {math.exp(min(loss, 700)):.2f} '
        f'on {"--data" if FLAGS.data else "the validation split"}')


def generate():
  graphdef, params, tokenizer, _, _ = _restore(_workdir())
  print(_sample(graphdef, params, tokenizer))


def train_tokenizer():
  """Trains --tokenizer (bpe:... or wordpiece:...) on the training split of --data."""
  import time
  from data import DataError
  from data import corpus as corpus_lib
  from data import tokenizer as tokenizer_lib
  if not FLAGS.tokenizer_out:
    raise DataError('--mode=tokenizer needs --tokenizer_out=<path> for the vocabulary')
  if os.path.exists(FLAGS.tokenizer_out):
    raise DataError(f'{FLAGS.tokenizer_out} already exists; pass another --tokenizer_out')
  splits = corpus_lib.split_corpus(FLAGS.data, FLAGS.val_fraction)
  start = time.perf_counter()
  tokenizer_lib.train_tokenizer(FLAGS.tokenizer, corpus_lib.texts_of(splits['train']),
                                FLAGS.tokenizer_out)
  tokenizer = tokenizer_lib.load_tokenizer(FLAGS.tokenizer_out)
  print(f'wrote {FLAGS.tokenizer_out}: {tokenizer.n_vocab} tokens, trained on '
        f'{len(splits["train"])} files in {time.perf_counter() - start:.1f}s')


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'unexpected arguments: {" ".join(argv[1:])}')
  logging.set_verbosity(logging.WARNING)  # Orbax logs every save at INFO.
  from data import DataError
  from models.config import ConfigError
  from training.checkpoint import CheckpointError
  from training.loop import Interrupted, TrainingError
  from training.workdir import WorkdirError
  try:
    {'train': train, 'eval': evaluate, 'generate': generate,
     'tokenizer': train_tokenizer}[FLAGS.mode]()
  except (ConfigError, DataError, CheckpointError, TrainingError, WorkdirError) as e:
    print(f'error: {e}', file=sys.stderr)
    sys.exit(1)
  except Interrupted as e:
    print(str(e), file=sys.stderr)
    sys.exit(e.exit_code)


if __name__ == '__main__':
  app.run(main)
