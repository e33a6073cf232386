r"""Full fine-tuning against parameter-efficient methods: what they learn, what they forget.

  python experiments/finetuning.py                     # quick: about 10 minutes on 2 CPU cores
  python experiments/finetuning.py --methods=full,lora4 --seeds=3 --sft_steps=300
  python experiments/finetuning.py --scale=full        # a GPU or TPU

First a base model is pre-trained on --data (default: the Python standard library) in
<out>/base, or --base names a run to start from. Every method then fine-tunes it with
--objective=sft on a synthetic instruction task written to <out>/task.jsonl: the user gives
a word of 3-8 letters, the assistant answers it reversed (ChatML). Methods:
  full           every parameter trains (learning rate --full_learning_rate)
  loraN          LoRA of rank N on q, k, v, o, gate, up, down (alpha = 2 N)
  qloraN         the same on the base's kernels stored in NF4 (QLoRA)
  adapterM       Houlsby adapters of bottleneck M after each sublayer
  llama_adapterK LLaMA-Adapter: K gated adaption prompts in every layer
  promptP        prompt tuning: P virtual tokens before each row (one conversation per row)
  prefixO        prefix tuning: O trained keys and values in every layer (one per row)
The parameter-efficient methods train at --peft_learning_rate.

Per run: the target task's loss (held-out assistant tokens) before and after; forgetting,
the base corpus's validation loss after fine-tuning minus before; trainable parameters;
milliseconds per step; the compiled step's temporary memory.

What to expect: Hu et al. (2021) report LoRA matching full fine-tuning with a tiny share of
the trainable parameters (GPT-3 175B: 0.01%, equal or better on WikiSQL, MNLI, SAMSum);
Biderman et al. (2024, "LoRA Learns Less and Forgets Less") find that LoRA reaches a worse
target loss than full fine-tuning but keeps more of the source domain, the gap shrinking as
the rank grows. Houlsby et al. (2019) come within 0.4 GLUE points of full fine-tuning with
3.6% of BERT's parameters trained as adapters; Zhang et al. (2023) tune LLaMA-7B to follow
instructions with 1.2M adaption-prompt parameters. Dettmers et al. (2023) find QLoRA's NF4
base matching 16-bit LoRA and full fine-tuning. Lester et al. (2021) find prompt tuning
closing the gap to full fine-tuning only as models reach billions of parameters; at small
sizes it trails far behind. Li & Liang (2021) find prefix tuning (0.1% of GPT-2's
parameters) matching full fine-tuning on table-to-text, and better in low-data settings.

Writes to --out: results.csv, results.md, loss_curves.png and final_loss.png.
"""
import dataclasses
import json
import os
import re

import numpy as np
from absl import app, flags

from lmlab.experiments import grid, report
from lmlab.models.config import UNPACKED_PEFTS
from lmlab.training import loop
from lmlab.training import run as run_lib
from lmlab.training.workdir import read_config

flags.DEFINE_list('methods', ['full', 'lora1', 'lora4', 'lora16', 'qlora4', 'adapter16',
                             'llama_adapter10', 'prompt10', 'prefix10'],
                  'Fine-tuning methods: full, loraN, qloraN, adapterM, llama_adapterK, promptP, '
                  'prefixO (see above).')
flags.DEFINE_string('base', None, 'A pre-trained run to fine-tune; default: one trained here.')
flags.DEFINE_integer('sft_steps', None, 'Fine-tuning steps per method.')
flags.DEFINE_float('full_learning_rate', 1e-3, 'Peak learning rate of full fine-tuning.')
flags.DEFINE_float('peft_learning_rate', 1e-2, 'Peak learning rate of the parameter-efficient '
                   'methods.')
flags.DEFINE_integer('task_examples', 2000, 'Conversations of the synthetic task.')

FLAGS = flags.FLAGS
LORA_TARGETS = 'q,k,v,o,gate,up,down'
SCRIPT_DEFAULTS = {'quick': dict(steps=400, sft_steps=150, seq_len=64),
                   'full': dict(sft_steps=1000)}


def method_fields(method: str) -> dict:
  """The model config fields of a method."""
  if method == 'full':
    return {}
  named = re.fullmatch(r'(q?lora|adapter|llama_adapter|prompt|prefix)(\d+)', method)
  if not named or int(named.group(2)) < 1:
    raise grid.ExperimentError(f'--methods: {method!r} is not full, loraN, qloraN, adapterM, '
                               'llama_adapterK, promptP or prefixO with a number >= 1')
  kind, size = named.group(1), int(named.group(2))
  lora = dict(peft='lora', lora_rank=size, lora_alpha=2.0 * size, lora_targets=LORA_TARGETS)
  return {'lora': lora, 'qlora': dict(lora, lora_quantize='nf4'),
          'adapter': dict(peft='adapter', adapter_size=size),
          'llama_adapter': dict(peft='llama_adapter', adaption_tokens=size),
          'prompt': dict(peft='prompt', prompt_tokens=size),
          'prefix': dict(peft='prefix', prefix_tokens=size)}[kind]


def write_task(path: str, n: int):
  """The reversal task: a fixed file, so every method and seed sees the same data."""
  rng = np.random.default_rng(0)
  letters = list('abcdefghijklmnopqrstuvwxyz')
  with open(path, 'w', encoding='utf-8') as f:
    for _ in range(n):
      word = ''.join(rng.choice(letters, rng.integers(3, 9)))
      f.write(json.dumps({'messages': [{'role': 'user', 'content': word},
                                       {'role': 'assistant', 'content': word[::-1]}]}) + '\n')


def pretrained(settings) -> str:
  """The base run's workdir: --base, or one trained here (resumed if interrupted)."""
  if FLAGS.base:
    return FLAGS.base
  workdir = os.path.join(settings.out, 'base')
  setup = settings.base_setup({k: v[0] for k, v in settings.common_axes.items()}, seed=0)
  print(f'pre-training the base model in {workdir}', flush=True)
  loop.train(dataclasses.replace(setup.train, workdir=workdir), setup.model, setup.optimizer,
             print_fn=lambda *_: None)
  return workdir


def run():
  settings = grid.Settings('finetuning', SCRIPT_DEFAULTS)
  axes = {'method': settings.values('methods')}
  for method in axes['method']:
    method_fields(method)
  os.makedirs(settings.out, exist_ok=True)
  task = os.path.join(settings.out, 'task.jsonl')
  write_task(task, FLAGS.task_examples)
  base = pretrained(settings)
  base_config = read_config(base)

  def configure(cell, setup):
    fields = method_fields(cell['method'])
    model, tokenizer, init_params = run_lib.init_from(
        base, [f'{name}={value}' for name, value in fields.items()])
    learning_rate = (FLAGS.full_learning_rate if cell['method'] == 'full'
                     else FLAGS.peft_learning_rate)
    steps = settings.value('sft_steps')
    return dataclasses.replace(
        setup, model=model, init_params=init_params, init_description=f'{base} {fields}',
        train=dataclasses.replace(setup.train, objective='sft', data=task, steps=steps,
                                  tokenizer=tokenizer, chat_template='chatml',
                                  eval_every=max(1, steps // 3)),
        optimizer=dataclasses.replace(setup.optimizer, learning_rate=learning_rate,
                                      total_steps=steps))

  def on_source(trained, params) -> float:
    """Validation loss of params on the base run's corpus, as the base run measured it (a
    prompt- or prefix-tuned model, whose learned tokens no packed document could see, on
    unmasked windows)."""
    base_train = dataclasses.replace(trained.setup.train, data=base_config['data'],
                                     objective='lm', chat_template=None,
                                     seq_len=base_config['seq_len'],
                                     document_masking=trained.model.peft not in UNPACKED_PEFTS)
    source = grid.Trained(dataclasses.replace(trained.setup, train=base_train), trained.model,
                          params)
    return source.eval_loss(params, base_config['seq_len'])

  def measure(trained):
    """Loss on the base run's corpus after fine-tuning, and its rise from before."""
    if trained.params is None:
      return {}
    before = on_source(trained, trained.initial_params())
    sizes = grid.run_sizes(trained.setup.train.workdir)
    after = on_source(trained, trained.params)
    return {'source_loss': after, 'forgetting': after - before,
            'trainable_params': sizes.get('trainable_params'),
            'step_temp_mib': sizes.get('step_temp_bytes', float('nan')) / 2**20}

  records = grid.run(settings, settings.cells(axes), configure, measure)
  shown = settings.shown_axes(axes)
  plots = report.curves_and_final_loss(settings, records, shown)
  report.write(
      settings, records,
      title='Full and parameter-efficient fine-tuning: what each learns and forgets',
      intro=f'Each method fine-tunes the base run {base} on a word-reversal chat task '
            '(assistant tokens only); forgetting is the rise of the base corpus\'s validation '
            'loss.',
      axes=shown, plots=plots,
      columns=[report.Column('final_eval_loss', 'task loss'),
               report.Column('initial_eval_loss', 'task loss before'),
               report.Column('source_loss', 'source loss after'),
               report.Column('forgetting', 'forgetting (source loss rise)'),
               report.Column('trainable_params', 'trainable parameters', 0),
               report.Column('step_ms', 'ms/step', 1),
               report.Column('step_temp_mib', 'step temporaries MiB', 1)])


main = grid.entry_point(run)

if __name__ == '__main__':
  app.run(main)
