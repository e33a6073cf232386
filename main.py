"""lmlab: train, evaluate and sample from transformer language models.

  python main.py                       # train the tiny default on the Python stdlib, ~3 min on CPU
  python main.py --mode=eval --workdir=runs/tiny
  python main.py --mode=generate --workdir=runs/tiny --prompt='def '
  python main.py --model=tiny --set norm_placement=post --set mlp=gelu --workdir=runs/post
  python main.py --model=bert-tiny                 # MLM + NSP pre-training, WordPiece vocabulary
  python main.py --model=roberta-tiny              # RoBERTa: MLM only, dynamic masking
  python main.py --model=bert-tiny --objective=classify --data=labels.tsv \
      --init_from=runs/bert-tiny --workdir=runs/classify  # fine-tune on label<TAB>text lines
  python main.py --model=transformer-tiny --data=synthetic:reverse   # or pairs.tsv
  python main.py --mode=generate --hf_checkpoint=path/to/Qwen2-0.5B --prompt='def '
  python main.py --mode=convert --hf_checkpoint=path/to/Qwen2-0.5B --workdir=runs/qwen
  python main.py --mode=convert --workdir=runs/tiny --hf_out=exported/tiny

Any ModelConfig field can be overridden with --set field=value (repeatable); the resolved
config is written to <workdir>/config.json. Re-running a train command in the same workdir
resumes from its latest checkpoint.
"""
import dataclasses
import math
import os
import sys

from absl import app, flags, logging

MODES = ('train', 'eval', 'generate', 'tokenizer', 'convert')

flags.DEFINE_enum('mode', 'train', MODES, 'What to do.')
flags.DEFINE_string('model', 'tiny', 'Model preset (models/config.py PRESETS).')
flags.DEFINE_multi_string('set', [], 'Override a ModelConfig field: --set n_layers=8.')
flags.DEFINE_string('workdir', None, 'Run folder (config, metrics, checkpoints, token cache); '
                    'default runs/<model>.')
flags.DEFINE_integer('steps', 500, 'Training steps (optimizer updates).')
flags.DEFINE_integer('batch_size', 32, 'Sequences per step (split over --grad_accum).')
flags.DEFINE_integer('seq_len', 128, 'Tokens per sequence.')
flags.DEFINE_integer('grad_accum', 1, 'Micro-batches whose gradients make one update.')
flags.DEFINE_float('learning_rate', 3e-3, 'Peak learning rate; 1e-3 unless given for BERT '
                   'and encoder-decoder models (post-LN).')
flags.DEFINE_integer('warmup_steps', 50, 'Linear warmup steps.')
flags.DEFINE_integer('schedule_steps', 0, 'Length of the cosine schedule; 0: --steps.')
flags.DEFINE_float('weight_decay', 0.1, 'AdamW weight decay (matrices only).')
flags.DEFINE_float('clip_norm', 1.0, 'Global gradient-norm clip.')
flags.DEFINE_enum('schedule', 'cosine', ['cosine', 'inverse_sqrt'], 'Learning-rate decay after '
                  'warmup: cosine, or 1/sqrt(step) as Vaswani et al. 2017.')
flags.DEFINE_float('label_smoothing', None, 'seq2seq: target mass spread over the vocabulary; '
                   'default 0.1 (Vaswani et al. 2017).')
flags.DEFINE_integer('beam_size', 4, 'seq2seq eval: beam search width beside greedy decoding; '
                     '1: greedy only.')
flags.DEFINE_float('length_penalty', 0.6, 'seq2seq beam search: alpha of ((5+len)/6)^alpha.')
flags.DEFINE_integer('seed', 0, 'Seed of initialisation, batches and dropout.')
flags.DEFINE_string('data', None, 'A text file, directory or glob; default: the Python '
                    'standard library of this interpreter.')
flags.DEFINE_float('val_fraction', 0.05, 'Share of files (or of a single file) held out.')
flags.DEFINE_string('tokenizer', 'bytes', 'bytes | bpe:<size>[:gpt2|:cl100k][:digits] | '
                    'wordpiece:<size> | a .tiktoken, tokenizer.json or vocab.txt file '
                    '(data/tokenizer.py). Default for BERT presets: wordpiece:8192; with '
                    '--init_from: that run\'s.')
flags.DEFINE_enum('objective', None, ['lm', 'bert', 'roberta', 'classify', 'seq2seq'],
                  'What to learn (training/objectives.py); default: lm for decoders, bert or '
                  'roberta for encoders (by their NSP head), seq2seq for encoder-decoders.')
flags.DEFINE_string('init_from', None, 'A training run whose latest parameters start this '
                    'run wherever path and shape agree (fine-tuning); its model config and '
                    'tokenizer are used, with --set on top.')
flags.DEFINE_string('tokenizer_pattern', None, 'Pre-tokenisation (gpt2, cl100k or a regex) '
                    'of a .tiktoken file that has no .json beside it.')
flags.DEFINE_string('tokenizer_sha256', None, 'Expected sha256 of a .tiktoken --tokenizer file.')
flags.DEFINE_string('tokenizer_out', None, '--mode=tokenizer: where to write the vocabulary.')
flags.DEFINE_bool('document_masking', True, 'Keep packed documents from attending to each '
                  'other (segment ids at end-of-text tokens).')
flags.DEFINE_float('z_loss', 0.0, 'Weight of the log^2 Z logit penalty (PaLM: 1e-4); 0: off.')
flags.DEFINE_float('max_z_loss', 0.0, 'Weight of the max-logit^2 penalty (Baichuan 2: 2e-4); '
                   '0: off.')
flags.DEFINE_integer('eval_every', 100, 'Evaluate every N steps.')
flags.DEFINE_integer('eval_batches', 16, 'Validation batches per evaluation.')
flags.DEFINE_integer('save_every', 100, 'Checkpoint every N steps.')
flags.DEFINE_integer('keep_checkpoints', 3, 'Checkpoints kept.')
flags.DEFINE_integer('log_every', 10, 'Log a metrics line every N steps.')
flags.DEFINE_string('mesh', 'data:-1', 'Device mesh: sizes of the data, fsdp and tensor axes, '
                    'e.g. data:2,fsdp:2,tensor:2 (-1: the devices left; unnamed axes: 1).')
flags.DEFINE_string('logical_rules', '', 'Changes to the logical-axis rules (models/sharding.py),'
                    ' e.g. embed:none,batch:data+fsdp,length:tensor.')
flags.DEFINE_float('peak_flops', 0.0, 'Peak FLOP/s of one device for the MFU metric; 0: from the '
                   'table of known GPUs and TPUs (training/mfu.py).')
flags.DEFINE_bool('distributed', False, 'Join a multi-process run (jax.distributed.initialize); '
                  'the three flags below, where not given, come from the environment.')
flags.DEFINE_string('coordinator_address', None, 'host:port of process 0 (this flag and the '
                    'two below imply --distributed).')
flags.DEFINE_integer('num_processes', None, 'Processes in the run.')
flags.DEFINE_integer('process_id', None, 'This process\'s index, 0..num_processes-1.')
flags.DEFINE_string('hf_checkpoint', None, 'A Hugging Face folder (config.json, *.safetensors): '
                    '--mode=eval/generate run it instead of a workdir checkpoint, and '
                    '--mode=convert turns it into a --workdir checkpoint. Its tokenizer.json '
                    '(BERT: vocab.txt) is the tokenizer unless --tokenizer is given; eval of BERT '
                    'reports the masked-LM loss. --set may change only run settings (dtype, '
                    'param_dtype, attention_impl, dca_chunk_size, ...).')
flags.DEFINE_string('hf_out', None, '--mode=convert: write the --workdir\'s latest checkpoint to '
                    'this new folder in Hugging Face format.')
flags.DEFINE_string('prompt', '', 'Prompt for generation (empty: start of a document).')
flags.DEFINE_integer('max_new_tokens', 200, 'Tokens to generate.')
flags.DEFINE_float('temperature', 0.8, 'Sampling temperature; 0 is greedy.')
flags.DEFINE_integer('top_k', 0, 'Sample among the k likeliest tokens; 0: all.')
flags.DEFINE_float('top_p', 1.0, 'Nucleus sampling mass; 1: off.')
flags.DEFINE_float('repetition_penalty', 1.0, 'Penalty for tokens already present; 1: off.')

FLAGS = flags.FLAGS
# Post-LN stacks stall at the decoders' 3e-3 (Xiong et al. 2020); this one trains them.
POST_LN_LEARNING_RATE = 1e-3


def _model_config():
  from lmlab.models import config as config_lib
  return config_lib.with_overrides(config_lib.preset(FLAGS.model), FLAGS.set).validate()


def _workdir():
  if FLAGS.workdir:
    return FLAGS.workdir
  if FLAGS.hf_checkpoint:
    return os.path.join('runs', 'hf-' + os.path.basename(os.path.normpath(FLAGS.hf_checkpoint)))
  return os.path.join('runs', FLAGS.model)


def _train_config(tokenizer=None, objective='lm'):
  from lmlab.training.loop import TrainConfig
  smoothing = FLAGS.label_smoothing
  if smoothing is None:
    smoothing = 0.1 if objective == 'seq2seq' else 0.0
  return TrainConfig(
      objective=objective, label_smoothing=smoothing, beam_size=FLAGS.beam_size,
      length_penalty=FLAGS.length_penalty, workdir=_workdir(), steps=FLAGS.steps,
      batch_size=FLAGS.batch_size, seq_len=FLAGS.seq_len,
      grad_accum=FLAGS.grad_accum, seed=FLAGS.seed, data=FLAGS.data,
      val_fraction=FLAGS.val_fraction, tokenizer=tokenizer or FLAGS.tokenizer,
      tokenizer_pattern=FLAGS.tokenizer_pattern, tokenizer_sha256=FLAGS.tokenizer_sha256,
      document_masking=FLAGS.document_masking, z_loss=FLAGS.z_loss,
      max_z_loss=FLAGS.max_z_loss, eval_every=FLAGS.eval_every,
      eval_batches=FLAGS.eval_batches, save_every=FLAGS.save_every,
      keep_checkpoints=FLAGS.keep_checkpoints, log_every=FLAGS.log_every, mesh=FLAGS.mesh,
      logical_rules=FLAGS.logical_rules, peak_flops=FLAGS.peak_flops)


def _sampling_config():
  from lmlab.models.generation import SamplingConfig
  return SamplingConfig(max_new_tokens=FLAGS.max_new_tokens, temperature=FLAGS.temperature,
                        top_k=FLAGS.top_k, top_p=FLAGS.top_p,
                        repetition_penalty=FLAGS.repetition_penalty)


def _sample(graphdef, params, tokenizer, eot=None):
  """The prompt and its continuation; eot (default: the tokenizer's end-of-text) ends it."""
  import jax
  import jax.numpy as jnp
  from lmlab.data.tokenizer import separator_id
  from lmlab.models.generation import make_generate
  eot = separator_id(tokenizer) if eot is None else eot
  prompt = tokenizer.encode_ordinary(FLAGS.prompt) or [eot]
  generate = make_generate(graphdef, _sampling_config(), end_token=eot, n_valid=tokenizer.n_vocab)
  new_tokens = jax.device_get(generate(params, jnp.asarray([prompt], jnp.int32),
                                       jax.random.key(FLAGS.seed)))[0].tolist()
  if eot in new_tokens:
    new_tokens = new_tokens[:new_tokens.index(eot)]
  return FLAGS.prompt + tokenizer.decode(new_tokens, errors='replace')


def _restore(workdir):
  """(graphdef, params, tokenizer, TrainConfig, step) of a workdir's latest checkpoint."""
  from flax import nnx
  from lmlab.models.errors import CheckpointError
  from lmlab.models.registry import build
  from lmlab.training.checkpoint import Checkpoints
  from lmlab.training.loop import TrainConfig, load_run_tokenizer
  from lmlab.training.optimizer import OptimizerConfig, make_optimizer
  from lmlab.training.workdir import read_config
  resolved = read_config(workdir)
  fields = {f.name for f in dataclasses.fields(TrainConfig)}
  run = TrainConfig(**{k: v for k, v in resolved.items() if k in fields})
  abstract = nnx.eval_shape(lambda: build(resolved['model'], rngs=nnx.Rngs(0)))
  graphdef, abstract_params = nnx.split(abstract)
  checkpoints = Checkpoints(workdir)
  step = checkpoints.latest_step()
  if step is None:
    raise CheckpointError(f'no checkpoint in {checkpoints.directory}; train first')
  optimizer = make_optimizer(OptimizerConfig(**resolved['optimizer']))
  params, _, _ = checkpoints.restore(step, abstract_params, optimizer.init)
  checkpoints.close()
  return graphdef, params, load_run_tokenizer(run), run, step


def _hf_model():
  """(model, TrainConfig) of --hf_checkpoint; the run config names its tokenizer."""
  from lmlab.data.errors import DataError
  from lmlab.models import hf
  from lmlab.models.config import ConfigError, with_overrides
  from lmlab.models.hf.architecture import RUN_FIELDS
  _, config = hf.read_config(FLAGS.hf_checkpoint)
  changed = with_overrides(config, FLAGS.set)
  fixed = [f.name for f in dataclasses.fields(config)
           if f.name not in RUN_FIELDS and getattr(changed, f.name) != getattr(config, f.name)]
  if fixed:
    raise ConfigError(f'--set {fixed[0]} would change the checkpoint\'s architecture; with '
                      f'--hf_checkpoint only {", ".join(RUN_FIELDS)} can be set')
  tokenizer = FLAGS.tokenizer if FLAGS['tokenizer'].present else None
  if tokenizer is None:
    # BERT's WordPiece vocabulary is its vocab.txt (our reader of tokenizer.json is BPE's).
    name = 'vocab.txt' if config.family == 'encoder' else 'tokenizer.json'
    tokenizer = os.path.join(FLAGS.hf_checkpoint, name)
    if not os.path.exists(tokenizer):
      raise DataError(f'{FLAGS.hf_checkpoint} has no {name}; pass --tokenizer')
  model = hf.load(FLAGS.hf_checkpoint, **{name: getattr(changed, name) for name in RUN_FIELDS})
  return model, _train_config(tokenizer, _default_objective(config))


def _checkpoint_or_hf():
  """(graphdef, params, tokenizer, TrainConfig, what was loaded) for eval and generate."""
  if not FLAGS.hf_checkpoint:
    graphdef, params, tokenizer, run, step = _restore(_workdir())
    return graphdef, params, tokenizer, run, f'checkpoint {step}'
  from flax import nnx
  from lmlab.training.loop import load_run_tokenizer
  model, run = _hf_model()
  graphdef, params = nnx.split(model)
  return graphdef, params, load_run_tokenizer(run), run, FLAGS.hf_checkpoint


def _default_objective(model_config) -> str:
  if model_config.family == 'encoder':
    return 'bert' if model_config.nsp_head else 'roberta'
  return {'decoder': 'lm', 'encoder_decoder': 'seq2seq'}[model_config.family]


def _init_from():
  """(model config, tokenizer spec, init_params) of --init_from: its config with --set on
  top, its tokenizer, and its parameters wherever the new model has one of the same path
  and shape (a classifier keeps the pre-trained encoder and gets a fresh head)."""
  from flax import nnx
  from lmlab.data import tokenizer as tokenizer_lib
  from lmlab.models import config as config_lib
  from lmlab.training.loop import tokenizer_dir
  from lmlab.training.workdir import read_config
  resolved = read_config(FLAGS.init_from)
  _, source, _, run, _ = _restore(FLAGS.init_from)
  source = dict(nnx.to_flat_state(source))
  path = tokenizer_lib.source_file(run.tokenizer, tokenizer_dir(FLAGS.init_from))

  def init_params(params):
    return nnx.from_flat_state([
        (name, source[name] if name in source and source[name].shape == value.shape else value)
        for name, value in nnx.to_flat_state(params)])

  model_config = config_lib.with_overrides(resolved['model'], FLAGS.set).validate()
  return model_config, path or run.tokenizer, init_params


def train():
  from lmlab.training.loop import train as train_loop
  from lmlab.training.objectives import OBJECTIVES
  from lmlab.training.optimizer import OptimizerConfig
  init_params, tokenizer = None, None
  if FLAGS.init_from:
    model_config, tokenizer, init_params = _init_from()
  else:
    model_config = _model_config()
  if model_config.family == 'encoder' and not FLAGS['tokenizer'].present:
    tokenizer = tokenizer or 'wordpiece:8192'
  objective = FLAGS.objective or _default_objective(model_config)
  learning_rate = FLAGS.learning_rate
  if model_config.family != 'decoder' and not FLAGS['learning_rate'].present:
    learning_rate = POST_LN_LEARNING_RATE
  opt_config = OptimizerConfig(learning_rate=learning_rate,
                               warmup_steps=FLAGS.warmup_steps,
                               total_steps=FLAGS.schedule_steps or FLAGS.steps,
                               weight_decay=FLAGS.weight_decay, clip_norm=FLAGS.clip_norm,
                               schedule=FLAGS.schedule)
  params, graphdef, tokenizer, summary = train_loop(
      _train_config(tokenizer, objective), model_config, opt_config, init_params=init_params,
      objective=OBJECTIVES[objective])
  import jax
  # Every process takes part in the sampling below (the parameters span them all); one
  # reports.
  report = print if jax.process_index() == 0 else (lambda *args: None)
  initial = summary['initial_eval_loss']
  report(f'validation loss {summary["eval_loss"]:.4f}' +
         (f', perplexity {summary["eval_ppl"]:.2f}' if 'eval_ppl' in summary else '') +
         f' after {summary["step"]} steps' +
         (f' (step 0: {initial:.4f})' if initial is not None else ''))
  others = [f'{k} {v:.4f}' for k, v in summary.items()
            if k.startswith('eval_') and k not in ('eval_loss', 'eval_ppl')]
  if others:
    report(', '.join(others))
  if objective == 'lm':
    report('sample:\n' + _sample(graphdef, params, tokenizer))


def evaluate():
  from lmlab.data.errors import DataError
  from lmlab.data import batches as batches_lib
  from lmlab.data import corpus as corpus_lib
  from lmlab.training.loop import end_token, evaluate as evaluate_tokens, tokenize
  from flax import nnx
  from lmlab.models.config import ConfigError
  from lmlab.training.objectives import OBJECTIVES
  from lmlab.training.steps import make_eval_step
  graphdef, params, tokenizer, run, loaded = _checkpoint_or_hf()
  model_config = nnx.merge(graphdef, params).config
  if run.objective != 'lm':  # The run's own held-out data and metrics.
    if run.objective in ('bert', 'roberta') and not model_config.mlm_head:
      raise ConfigError(f'{loaded} has no masked-LM head to evaluate; --mode=eval of an encoder '
                        'needs BertForMaskedLM, BertForPreTraining or RobertaForMaskedLM')
    task = OBJECTIVES[run.objective](run, model_config)
    task.load_data()
    metrics = task.evaluate(graphdef, params)
    print(f'{loaded}: ' + ', '.join(f'{name} {value:.4f}' for name, value in metrics.items()))
    return
  if model_config.family != 'decoder':
    raise ConfigError(f'--mode=eval measures next-token loss; a family={model_config.family} '
                      'model is evaluated from the workdir of its training run')
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
  print(f'{loaded}: loss {loss:.4f}, perplexity {math.exp(min(loss, 700)):.2f} '
        f'on {"--data" if FLAGS.data else "the validation split"}')


def generate():
  from flax import nnx
  from lmlab.models.config import ConfigError
  graphdef, params, tokenizer, _, _ = _checkpoint_or_hf()
  family = nnx.merge(graphdef, params).config.family
  if family != 'decoder':
    raise ConfigError(f'--mode=generate samples from decoders, not family={family}')
  eot = None
  if FLAGS.hf_checkpoint:
    from lmlab.models import hf
    eot = hf.end_token_id(FLAGS.hf_checkpoint)
  print(_sample(graphdef, params, tokenizer, eot))


def convert():
  """--hf_checkpoint -> a new --workdir checkpoint, or a --workdir's latest -> --hf_out."""
  from flax import nnx
  from lmlab.models import hf
  from lmlab.models.errors import CheckpointError
  if FLAGS.hf_checkpoint:
    from lmlab.training.checkpoint import Checkpoints
    from lmlab.training.optimizer import OptimizerConfig
    from lmlab.training.workdir import WorkdirError, config_path, record_config
    workdir = _workdir()
    if os.path.exists(config_path(workdir)):
      raise WorkdirError(f'{workdir} already holds a run; pass a new --workdir')
    model, run = _hf_model()
    record_config(workdir, {'model': model.config, **dataclasses.asdict(run),
                            'optimizer': dataclasses.asdict(OptimizerConfig())})
    checkpoints = Checkpoints(workdir)
    checkpoints.save(0, {'params': nnx.state(model, nnx.Param)},
                     {'step': 0, 'params_only': True, 'source': FLAGS.hf_checkpoint,
                      'tokenizer': run.tokenizer})
    checkpoints.close()
    print(f'wrote {workdir}: step-0 checkpoint of {FLAGS.hf_checkpoint}')
    return
  if not FLAGS.hf_out:
    raise CheckpointError('--mode=convert needs --hf_checkpoint=<folder> (to a workdir) or '
                          '--hf_out=<new folder> (from --workdir)')
  graphdef, params, _, _, step = _restore(_workdir())
  hf.save(nnx.merge(graphdef, params), FLAGS.hf_out)
  print(f'wrote {FLAGS.hf_out}: checkpoint {step} of {_workdir()}')


def train_tokenizer():
  """Trains --tokenizer (bpe:... or wordpiece:...) on the training split of --data."""
  import time
  from lmlab.data.errors import DataError
  from lmlab.data import corpus as corpus_lib
  from lmlab.data import tokenizer as tokenizer_lib
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
  import jax
  from lmlab.data.errors import DataError
  from lmlab.models.errors import CheckpointError, ConfigError
  from lmlab.training.loop import Interrupted, TrainingError
  from lmlab.training.workdir import WorkdirError
  try:
    if FLAGS.distributed or any(FLAGS[name].present for name in
                                ('coordinator_address', 'num_processes', 'process_id')):
      from lmlab.training.parallel import initialize_distributed
      initialize_distributed(FLAGS.coordinator_address, FLAGS.num_processes, FLAGS.process_id)
    {'train': train, 'eval': evaluate, 'generate': generate, 'tokenizer': train_tokenizer,
     'convert': convert}[FLAGS.mode]()
  except (ConfigError, DataError, CheckpointError, TrainingError, WorkdirError) as e:
    print(f'error: {e}', file=sys.stderr)
    sys.exit(1)
  except Interrupted as e:
    print(str(e), file=sys.stderr)
    sys.exit(e.exit_code)
  except jax.errors.JaxRuntimeError as e:
    if 'RESOURCE_EXHAUSTED' not in str(e):
      raise
    print(f'error: out of memory ({str(e).splitlines()[0][:160]}); lower --batch_size or '
          '--seq_len, or --set attention_impl=chunked, --set remat=full, --grad_accum=N',
          file=sys.stderr)
    sys.exit(1)


def run():
  """The `lmlab` console script."""
  app.run(main)


if __name__ == '__main__':
  run()
