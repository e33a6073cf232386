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
  python main.py --mode=convert --workdir=runs/tiny --gguf_out=tiny.gguf   # for llama.cpp
  python main.py --objective=sft --data=chats.jsonl --init_from=runs/tiny --peft=lora \
      --workdir=runs/tiny-chat              # supervised fine-tuning of LoRA adapters
  python main.py --mode=chat --workdir=runs/tiny-chat   # talk to it (or --prompt=...)
  python main.py --mode=merge --workdir=runs/tiny-chat --hf_out=exported/merged
  python main.py --mode=eval --workdir=runs/tiny --quantize=int4:g128   # weight-only PTQ
  python main.py --mode=convert --workdir=runs/tiny --quantize=int8 --quantized_workdir=runs/q8
  python main.py --init_from=runs/tiny --qat=int4:g128 --workdir=runs/tiny-qat  # QAT
  python main.py --mode=generate --workdir=runs/tiny --draft=runs/tiny-draft --draft_tokens=4
  python main.py --mode=generate --workdir=runs/tiny --num_samples=8   # one shared prompt cache
  python main.py --mode=generate --workdir=runs/tiny --kv_cache_dtype=int8
  python main.py --mode=prune --workdir=runs/tiny --prune=2:4 --prune_score=wanda \
      --pruned_workdir=runs/tiny-2of4      # then --init_from=runs/tiny-2of4 to recover
  python main.py --objective=distill --teacher=runs/tiny --set d_model=64 \
      --workdir=runs/tiny-student          # knowledge distillation
  python main.py --mode=memory --model=llama2-7b --mesh=fsdp:8 --batch_size=8 --seq_len=4096 \
      --set dtype=bfloat16 --set param_dtype=bfloat16 --set remat=full   # GiB per device
  python main.py --mode=convert --workdir=runs/tiny-chat --hf_out=exported/base \
      --peft_out=exported/adapter          # a Hugging Face model and its peft adapter
  python main.py --objective=dpo --data=pairs.jsonl --init_from=runs/tiny-chat \
      --workdir=runs/tiny-dpo               # DPO (or --objective=reward: a reward model)
  python main.py --objective=grpo --data=prompts.jsonl --reward=my_rewards:score \
      --init_from=runs/tiny-chat --workdir=runs/tiny-grpo   # or rsft, ppo

Any ModelConfig field can be overridden with --set field=value (repeatable; --peft and the
flags of its methods' fields, --lora_*, --adapter_size, --adaption_* and --prompt_*, are
shortcuts for theirs); the resolved config is written to
<workdir>/config.json. Re-running a train command in the same workdir
resumes from its latest checkpoint.
"""
import dataclasses
import sys
import time

import jax
from absl import app, flags, logging

from lmlab.data.chat_template import chat_template, has_template
from lmlab.data.errors import DataError
from lmlab.models.config import ANY_PEFT_FIELDS, PEFT_FIELDS, ModelConfig
from lmlab.models.errors import CheckpointError, ConfigError
from lmlab.models.generation import SamplingConfig
from lmlab.training import curves, eval_results, loop, parallel
from lmlab.training import memory as memory_lib
from lmlab.training import run as run_lib
from lmlab.training.config import TrainConfig
from lmlab.training.dataclass_flags import define, field_comments, from_flags
from lmlab.training.optimizer import OptimizerConfig
from lmlab.training.trainer import Interrupted, TrainingError
from lmlab.training.workdir import WorkdirError

MODES = ('train', 'eval', 'generate', 'chat', 'tokenizer', 'convert', 'merge', 'prune',
         'memory', 'plot')
# ModelConfig fields with flags of their own, each the same as --set name=value.
MODEL_FLAGS = ('peft', 'qat', *ANY_PEFT_FIELDS,
               *(name for names in PEFT_FIELDS.values() for name in names))
OPTIMIZER_FLAGS = {'total_steps': 'schedule_steps'}

flags.DEFINE_enum('mode', 'train', MODES, 'What to do.')
flags.DEFINE_string('model', 'tiny', 'Model preset (models/config.py PRESETS).')
flags.DEFINE_multi_string('set', [], 'Override a ModelConfig field: --set n_layers=8.')
flags.DEFINE_string('init_from', None, 'A training run whose latest parameters start this '
                    'run wherever path and shape agree (fine-tuning); its model config and '
                    'tokenizer are used, with --set on top.')
flags.DEFINE_string('tokenizer_out', None, '--mode=tokenizer: where to write the vocabulary.')
flags.DEFINE_string('hf_checkpoint', None, 'A Hugging Face folder (config.json, *.safetensors): '
                    '--mode=eval/generate run it instead of a workdir checkpoint, and '
                    '--mode=convert turns it into a --workdir checkpoint. Its tokenizer.json '
                    '(BERT: vocab.txt) is the tokenizer unless --tokenizer is given; eval of BERT '
                    'reports the masked-LM loss. --set may change only run settings (dtype, '
                    'param_dtype, attention_impl, dca_chunk_size, ...).')
flags.DEFINE_string('tasks', None, '--mode=eval: built-in tasks instead of the validation '
                    'loss, e.g. bpb,lambada_style,mc:questions.jsonl (training/eval_tasks.py); '
                    'their text is --data or the validation split.')
flags.DEFINE_string('plot_out', 'curves.png', '--mode=plot: the PNG to draw the curves of '
                    '--workdir=a,b,... into.')
flags.DEFINE_string('hf_out', None, '--mode=convert: write the --workdir\'s latest checkpoint to '
                    'this new folder in Hugging Face format.')
flags.DEFINE_string('gguf_out', None, '--mode=convert: write the --workdir\'s latest checkpoint '
                    '(or --hf_checkpoint) to this new GGUF file, with its tokenizer and chat '
                    'template, for llama.cpp.')
flags.DEFINE_enum('gguf_type', 'f16', ['f32', 'f16', 'q8_0'], '--gguf_out: the type of the '
                  'weight matrices (norms and biases stay float32).')
flags.DEFINE_string('peft_out', None, '--mode=convert of a LoRA, prompt- or prefix-tuning run: '
                    'write its adapter to this new folder as a Hugging Face peft adapter (with '
                    '--hf_out, the base model).')
flags.DEFINE_string('peft_checkpoint', None, 'A Hugging Face peft LoRA, prompt- or prefix-tuning '
                    'folder whose adapter --mode=eval/generate/chat put on the model '
                    '(--hf_checkpoint or --workdir).')
flags.DEFINE_string('merged_workdir', None, '--mode=merge: write the merged model to this new '
                    'workdir (beside or instead of --hf_out).')
flags.DEFINE_string('quantize', None, 'Weight-only quantisation of the dense kernels at '
                    '--mode=eval/generate/chat/convert: int8, int4:g128, int4:g64:asym, ... '
                    '(models/weight_quant.py).')
flags.DEFINE_string('kv_cache_dtype', None, '--mode=generate|chat: int8 holds the decoding '
                    'KV cache as int8 codes and scales (models/kv_cache.py); \'\': as computed. '
                    'Default: the model\'s config.')
flags.DEFINE_string('quantized_workdir', None, '--mode=convert --quantize: write the quantised '
                    'model (of --hf_checkpoint or --workdir) to this new workdir.')
flags.DEFINE_string('prune', 'unstructured:0.5', '--mode=prune: unstructured:<sparsity> or n:m '
                    '(2:4) (models/pruning.py).')
flags.DEFINE_enum('prune_score', 'magnitude', ['magnitude', 'wanda'], '--mode=prune: what '
                  'ranks the weights: |W|, or Wanda\'s |W| times the input feature\'s norm.')
flags.DEFINE_integer('calibration_batches', 4, '--mode=prune --prune_score=wanda: training '
                     'batches the input norms are measured on.')
flags.DEFINE_string('pruned_workdir', None, '--mode=prune: the new workdir of the pruned model '
                    '(fine-tune it with --init_from to recover).')
flags.DEFINE_enum('memory_use', 'train', ['train', 'inference'], '--mode=memory: estimate a '
                  'train step (full fine-tuning, or LoRA with --peft=lora) or decoding.')
flags.DEFINE_integer('devices', None, '--mode=memory: devices of the --mesh (default: the '
                     'product of its sizes, or this machine\'s count where one is -1).')
flags.DEFINE_string('draft', None, '--mode=generate: a smaller run (workdir) with the same '
                    'tokenizer that drafts tokens for the model to verify (speculative '
                    'decoding; the samples are distributed as without it).')
flags.DEFINE_integer('draft_tokens', 4, 'Tokens the --draft proposes per verification '
                     '(gamma).')
flags.DEFINE_integer('num_samples', 1, '--mode=generate: continuations of --prompt, drawn '
                     'together over one copy of its KV cache (models/shared_prefix.py).')
flags.DEFINE_string('prompt', '', 'Prompt for generation (empty: start of a document); '
                    '--mode=chat: one user message to answer, instead of a conversation on stdin.')
for _name in MODEL_FLAGS:
  flags.DEFINE_string(_name, None, f'{field_comments(ModelConfig)[_name]} (--set {_name}=...)')
flags.DEFINE_bool('distributed', False, 'Join a multi-process run (jax.distributed.initialize); '
                  'the three flags below, where not given, come from the environment.')
flags.DEFINE_string('coordinator_address', None, 'host:port of process 0 (this flag and the '
                    'two below imply --distributed).')
flags.DEFINE_integer('num_processes', None, 'Processes in the run.')
flags.DEFINE_integer('process_id', None, 'This process\'s index, 0..num_processes-1.')
define(TrainConfig)
define(OptimizerConfig, names=OPTIMIZER_FLAGS)
define(SamplingConfig)

FLAGS = flags.FLAGS


def _train_config() -> TrainConfig:
  return from_flags(TrainConfig, workdir=FLAGS.workdir or run_lib.default_workdir(
      FLAGS.model, FLAGS.hf_checkpoint))


def _samples(graphdef, params, tokenizer, eot=None, num_samples=1) -> list[str]:
  return run_lib.sample(graphdef, params, tokenizer, FLAGS.prompt, from_flags(SamplingConfig),
                        seed=FLAGS.seed, eot=eot, num_samples=num_samples)


def _overrides() -> list[str]:
  """--set, and the model flags given, as field=value."""
  return FLAGS.set + [f'{name}={FLAGS[name].value}' for name in MODEL_FLAGS
                      if FLAGS[name].value is not None]


def _loaded():
  loaded = run_lib.load(_train_config(), FLAGS.hf_checkpoint, _overrides(), FLAGS.tokenizer)
  if FLAGS.peft_checkpoint:
    loaded = run_lib.with_peft_checkpoint(loaded, FLAGS.peft_checkpoint)
  if FLAGS.quantize:
    loaded = run_lib.with_quantized_weights(loaded, FLAGS.quantize)
  if FLAGS.kv_cache_dtype is not None:
    loaded = run_lib.with_kv_cache_dtype(loaded, FLAGS.kv_cache_dtype)
  return loaded


def train():
  train_config, init_params = _train_config(), None
  if FLAGS.init_from:
    model_config, tokenizer, init_params = run_lib.init_from(FLAGS.init_from, _overrides())
    train_config = dataclasses.replace(train_config, tokenizer=FLAGS.tokenizer or tokenizer)
  else:
    model_config = run_lib.preset_config(FLAGS.model, _overrides())
  params, graphdef, tokenizer, summary = loop.train(
      train_config, model_config, from_flags(OptimizerConfig, names=OPTIMIZER_FLAGS),
      init_params=init_params)
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
  if train_config.resolved(model_config).objective == 'lm':
    report('sample:\n' + _samples(graphdef, params, tokenizer)[0])


def evaluate():
  """Prints the run's metrics (or --tasks') and, for a workdir, records them in its
  eval_results.json."""
  loaded = _loaded()
  eval_batches = FLAGS.eval_batches if FLAGS['eval_batches'].present else None
  if FLAGS.tasks:
    results = run_lib.evaluate_tasks(loaded, FLAGS.tasks, FLAGS.data, eval_batches)
  else:
    results = {loaded.run.objective: run_lib.evaluate(loaded, FLAGS.data, eval_batches)}
  if not FLAGS.hf_checkpoint:
    settings = {'data': FLAGS.data or 'the validation split',
                'eval_batches': eval_batches or loaded.run.eval_batches,
                'seq_len': loaded.run.seq_len, 'batch_size': loaded.run.micro_batch_size,
                'quantize': FLAGS.quantize, 'peft_checkpoint': FLAGS.peft_checkpoint,
                'tasks': FLAGS.tasks}
    for task, metrics in results.items():
      eval_results.append(_train_config().workdir, task, metrics, step=loaded.step,
                          settings=settings)
  if not FLAGS.tasks and loaded.run.objective == 'lm':
    metrics = results['lm']
    print(f'{loaded.source}: loss {metrics["loss"]:.4f}, perplexity '
          f'{metrics["perplexity"]:.2f} on {"--data" if FLAGS.data else "the validation split"}')
    return
  for task, metrics in results.items():
    print(f'{loaded.source} {task}: ' + ', '.join(f'{k} {v:.4f}' for k, v in metrics.items()))


def generate():
  loaded = _loaded()
  if not FLAGS.draft:
    texts = _samples(loaded.graphdef, loaded.params, loaded.tokenizer, loaded.end_token,
                     FLAGS.num_samples)
    for i, text in enumerate(texts):
      if len(texts) > 1:
        print(f'--- sample {i + 1} of {len(texts)} ---')
      print(text)
    return
  if FLAGS.num_samples != 1:
    raise ConfigError('--draft decodes one sample at a time; leave out --num_samples')
  start = time.perf_counter()
  text, stats = run_lib.speculative_sample(loaded, FLAGS.draft, FLAGS.prompt,
                                           from_flags(SamplingConfig),
                                           gamma=FLAGS.draft_tokens, seed=FLAGS.seed)
  print(text)
  print(f'speculative decoding: {stats["accepted"]} of {stats["drafted"]} drafted tokens '
        f'accepted ({stats["accepted"] / stats["drafted"]:.0%}) in {stats["rounds"]} target '
        f'passes; {time.perf_counter() - start:.1f}s with compilation', file=sys.stderr)


def _template_spec(loaded) -> str | None:
  """--chat_template, else the run's, else the --hf_checkpoint folder's or file's own."""
  own = (FLAGS.hf_checkpoint if FLAGS.hf_checkpoint and has_template(FLAGS.hf_checkpoint)
         else None)
  return FLAGS.chat_template or loaded.run.chat_template or own


def chat():
  """Answers --prompt, or each line of stdin as the next user turn of one conversation."""
  loaded = _loaded()
  template = chat_template(_template_spec(loaded) or 'chatml')

  def reply(messages):
    return run_lib.chat_reply(loaded.graphdef, loaded.params, loaded.tokenizer, template,
                              messages, from_flags(SamplingConfig), seed=FLAGS.seed)

  if FLAGS.prompt:
    print(reply([{'role': 'user', 'content': FLAGS.prompt}]))
    return
  messages = []
  for line in sys.stdin:
    messages.append({'role': 'user', 'content': line.rstrip('\n')})
    messages.append({'role': 'assistant', 'content': reply(messages)})
    print(messages[-1]['content'], flush=True)


def convert():
  """--hf_checkpoint -> a new --workdir checkpoint, or a --workdir's latest -> --hf_out
  (and a LoRA run's adapters -> --peft_out); with --quantize, either one quantised ->
  --quantized_workdir; with --gguf_out, either one -> a GGUF file."""
  workdir = _train_config().workdir
  if FLAGS.quantize and FLAGS.gguf_out:
    raise ConfigError('--gguf_out writes its own weight type (--gguf_type); leave out '
                      '--quantize')
  if FLAGS.quantize:
    loaded = _loaded()
    run_lib.write_quantized(loaded, FLAGS.quantized_workdir)
    print(f'wrote {FLAGS.quantized_workdir}: {loaded.source}')
  elif FLAGS.gguf_out:
    if FLAGS.hf_out or FLAGS.peft_out:
      raise ConfigError('--gguf_out writes one file; convert to --hf_out/--peft_out in a run '
                        'of its own')
    loaded = _loaded()
    spec = _template_spec(loaded)
    run_lib.to_gguf(loaded, FLAGS.gguf_out, FLAGS.gguf_type, spec and chat_template(spec))
    print(f'wrote {FLAGS.gguf_out} ({FLAGS.gguf_type}): {loaded.source}')
  elif FLAGS.hf_checkpoint:
    run_lib.hf_to_workdir(FLAGS.hf_checkpoint, _train_config(), _overrides(), FLAGS.tokenizer)
    print(f'wrote {workdir}: step-0 checkpoint of {FLAGS.hf_checkpoint}')
  elif FLAGS.hf_out or FLAGS.peft_out:
    step = run_lib.workdir_to_hf(workdir, FLAGS.hf_out, FLAGS.peft_out)
    written = ' and '.join(filter(None, (FLAGS.hf_out, FLAGS.peft_out)))
    print(f'wrote {written}: checkpoint {step} of {workdir}')
  else:
    raise CheckpointError('--mode=convert needs --hf_checkpoint=<folder> (to a workdir), '
                          '--hf_out=<new folder> / --peft_out=<new folder> (from --workdir) or '
                          '--gguf_out=<new file> (from either)')


def merge():
  """A LoRA --workdir's latest, adapters folded in -> --hf_out and/or --merged_workdir."""
  workdir = _train_config().workdir
  step = run_lib.merge_lora(workdir, hf_out=FLAGS.hf_out, out_workdir=FLAGS.merged_workdir)
  written = ' and '.join(filter(None, (FLAGS.hf_out, FLAGS.merged_workdir)))
  print(f'wrote {written}: checkpoint {step} of {workdir} with its LoRA adapters merged')


def prune():
  """--workdir's latest, pruned -> --pruned_workdir."""
  pruned, sparsity = run_lib.prune(_train_config().workdir, FLAGS.pruned_workdir, FLAGS.prune,
                                   FLAGS.prune_score, FLAGS.calibration_batches)
  print(f'wrote {FLAGS.pruned_workdir}: {pruned.source}; {sparsity:.1%} of the blocks\' dense '
        'weights are zero')


def memory():
  """Bytes per device of --model/--set at --batch_size/--grad_accum x --seq_len on --mesh
  (training/memory.py)."""
  train_config = _train_config()
  config = run_lib.preset_config(FLAGS.model, _overrides())
  if not config.vocab_size:  # The tokenizer's size, as training would make it.
    config = run_lib.resolved_vocab(config, train_config)
  sizes = memory_lib.estimate(
      config, batch_size=train_config.micro_batch_size, seq_len=train_config.seq_len,
      mesh=train_config.mesh, n_devices=FLAGS.devices or memory_lib.mesh_devices(
          train_config.mesh, jax.device_count()), use=FLAGS.memory_use)
  label = (f'{FLAGS.model} {FLAGS.memory_use}, micro-batch {train_config.micro_batch_size}x'
           f'{train_config.seq_len}, --mesh={train_config.mesh}, {config.param_dtype} params, '
           f'{config.dtype} compute, remat={config.remat}')
  print(memory_lib.table({label: sizes}))


def plot():
  """The curves of the comma-separated --workdir runs -> --plot_out (training/curves.py)."""
  workdirs = [w for w in (FLAGS.workdir or '').split(',') if w]
  if not workdirs:
    raise ConfigError('--mode=plot needs --workdir=<run>[,<run>...]')
  curves.plot(workdirs, FLAGS.plot_out)
  print(f'wrote {FLAGS.plot_out}: the curves of {", ".join(workdirs)}')


def train_tokenizer():
  """Trains --tokenizer (bpe:... or wordpiece:...) on the training split of --data."""
  print(run_lib.train_tokenizer(FLAGS.tokenizer, FLAGS.data, FLAGS.val_fraction,
                                FLAGS.tokenizer_out))


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'unexpected arguments: {" ".join(argv[1:])}')
  logging.set_verbosity(logging.WARNING)  # Orbax logs every save at INFO.
  try:
    if FLAGS.distributed or any(FLAGS[name].present for name in
                                ('coordinator_address', 'num_processes', 'process_id')):
      parallel.initialize_distributed(FLAGS.coordinator_address, FLAGS.num_processes,
                                      FLAGS.process_id)
    {'train': train, 'eval': evaluate, 'generate': generate, 'chat': chat,
     'tokenizer': train_tokenizer, 'convert': convert, 'merge': merge,
     'prune': prune, 'memory': memory, 'plot': plot}[FLAGS.mode]()
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
