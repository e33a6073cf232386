r"""The repeater: does a reward against repeated n-grams cure a small model's loops, and at
what cost, beside the decoding-time repetition penalty?

  python experiments/repetition.py                   # quick: about 6 minutes on 2 CPU cores
  python experiments/repetition.py --repetition_penalties=1.1,1.3 --seeds=2
  python experiments/repetition.py --scale=full      # a GPU or TPU

A small model is fine-tuned with --objective=sft to continue code: the prompt is a line of the
Python standard library (this interpreter's, as the default corpus), the reply the lines that
follow it (<out>/continuations.jsonl, its last --val_fraction held out). Greedy decoding of
such a model falls into loops ("self.x = x self.x = x ..."). Then, on the held-out prompts:
  sft        the model's greedy replies
  penalty    the same model decoded greedily with --repetition_penalty at each of
             --repetition_penalties (Keskar et al. 2019: a seen token's logit divided by it)
  grpo       the model trained for --steps with --objective=grpo on the prompts, its reward
             minus the number of the reply's word bigrams that repeat an earlier one
             (training/repetition.py), with the KL penalty to the SFT model (beta 0.04)
Per decoder: distinct-1 and distinct-2 of its greedy replies (Li et al. 2016; words:
training/repetition.py), their repeated bigrams and length in words, and, for trained
models, the KL to the SFT model of one sampled reply per prompt (the price of the change; a
penalty at decoding has no such number, as it changes no weights). The row 'data' measures
the held-out replies themselves: what a model that continues code as the library does would
score.

What to expect: Holtzman et al. (2020) show greedy and beam decoding of language models
degenerating into repetition; Keskar et al. (2019) propose the penalty, which also penalises
tokens that must recur (in code: brackets, 'self', '.'), so it trades one distortion for
another; Welleck et al. (2020) cure repetition by training (unlikelihood) rather than
decoding.

Writes to --out: continuations.jsonl, results.csv, results.md, distinct.png.
"""
import dataclasses
import json
import os

import numpy as np
from absl import app, flags

from lmlab.data import corpus
from lmlab.experiments import grid, report, stages
from lmlab.training import repetition
from lmlab.training import run as run_lib
from lmlab.training import rollouts

flags.DEFINE_list('repetition_penalties', ['1.2', '1.5'], 'The penalties of the "penalty" rows.')
flags.DEFINE_float('sample_temperature', 1.0, 'grpo: the temperature its completions are '
                   'sampled at.')
flags.DEFINE_integer('reply_tokens', None, 'The most tokens of a reply.')

FLAGS = flags.FLAGS
SCRIPT_DEFAULTS = {
    'quick': dict(seeds=3, warm_start_steps=400, steps=100, batch_size=64, seq_len=128,
                  d_model=64, n_layers=[2], learning_rate=[3e-3], warmup_steps=[10],
                  eval_every=1000, save_every=1000, reply_tokens=64),
    'full': dict(warm_start_steps=2000, steps=400, batch_size=64, seq_len=256, d_model=256,
                 n_layers=[4], reply_tokens=128),
}
EXAMPLES = 10_000
# A prompt line's length: four of them, as generation compiles once per prompt length.
PROMPT_CHARS = (24, 27)
REPLY_CHARS = 60  # The most characters of a reply (two lines).
REWARD = 'lmlab.training.repetition:reward'


def continuations(path: str) -> str:
  """Writes EXAMPLES {"prompt": a line, "completion": the non-blank lines after it} of the
  standard library's code (stripped of indentation), drawn in a fixed order."""
  candidates = []
  for file in corpus.stdlib_files()[1]:
    with open(file, encoding='utf-8', errors='replace') as f:
      lines = [line.strip() for line in f if line.strip()]
    for i, line in enumerate(lines[:-2]):
      reply = f'{lines[i + 1]}\n{lines[i + 2]}'
      if PROMPT_CHARS[0] <= len(line) <= PROMPT_CHARS[1] and len(reply) <= REPLY_CHARS:
        candidates.append((line, reply))
  rng = np.random.default_rng(0)
  chosen = rng.choice(len(candidates), min(EXAMPLES, len(candidates)), replace=False)
  with open(path, 'w') as f:
    for index in chosen:
      prompt, reply = candidates[index]
      f.write(json.dumps({'prompt': prompt, 'completion': reply}) + '\n')
  return path


def measured(replies: list[str]) -> dict:
  """Means over the replies of distinct-1/2, repeated bigrams and length in words."""
  return {'distinct_1': float(np.mean([repetition.distinct_n(r, 1) for r in replies])),
          'distinct_2': float(np.mean([repetition.distinct_n(r, 2) for r in replies])),
          'repeats': float(np.mean([repetition.repeated_ngrams(r, 2) for r in replies])),
          'words': float(np.mean([len(repetition.words(r)) for r in replies]))}


def measure_replies(task, params, sampler) -> dict:
  """measured() of `sampler`'s replies to every held-out prompt."""
  return measured(list(task.sample_replies(params, task.val, seed=0, sampler=sampler).values()))


def greedy_sampler(task, penalty: float):
  return rollouts.Sampler(task.model_config, task.tokenizer, task.sampler.template,
                          max_tokens=task.config.completion_tokens, temperature=0.0,
                          seq_len=task.config.seq_len, repetition_penalty=penalty)


def run():
  settings = grid.Settings('repetition', SCRIPT_DEFAULTS,
                           data='code continuations of the Python standard library')
  penalties = settings.values('repetition_penalties', float)
  if min(penalties) <= 0:
    raise grid.ExperimentError('--repetition_penalties must be positive')
  seq_len, reply_tokens = settings.value('seq_len'), settings.value('reply_tokens')
  os.makedirs(settings.out, exist_ok=True)
  data = continuations(os.path.join(settings.out, 'continuations.jsonl'))
  sft = stages.train_stage(settings, 'sft', 'sft', settings.value('warm_start_steps'),
                           settings.common_axes['learning_rate'][0], data)
  task = stages.reference_task(sft, data, seq_len, reply_tokens, reward=REWARD)
  with open(data) as f:
    examples = [json.loads(line) for line in f]
  records = [{**settings.cells({'method': ['data']})[0], 'seed': 0,
              **measured([examples[i]['completion'] for i in task.val])},
             {**settings.cells({'method': ['sft']})[0], 'seed': 0, 'kl': 0.0,
              **measure_replies(task, task.reference, task.greedy)}]
  for penalty in penalties:
    records.append({**settings.cells({'method': [f'penalty {penalty:g}']})[0], 'seed': 0,
                    **measure_replies(task, task.reference, greedy_sampler(task, penalty))})
  steps = settings.value('steps')

  def configure(cell, setup):
    model, tokenizer, init_params = run_lib.init_from(sft, [])
    return dataclasses.replace(
        setup, model=model, init_params=init_params, init_description=sft,
        train=dataclasses.replace(setup.train, objective='grpo', data=data, reward=REWARD,
                                  tokenizer=tokenizer, steps=steps,
                                  completion_tokens=reply_tokens,
                                  group_size=FLAGS.samples_per_prompt,
                                  sample_temperature=FLAGS.sample_temperature),
        optimizer=dataclasses.replace(setup.optimizer, learning_rate=FLAGS.policy_learning_rate,
                                      warmup_steps=max(1, steps // 10), total_steps=steps))

  def measure(trained):
    if trained.params is None:
      return {}
    return {'kl': task.held_out_kl(grid.graphdef_of(trained.model), trained.params),
            **measure_replies(task, trained.params, task.greedy)}

  records += grid.run(settings, settings.cells({'method': ['grpo']}), configure, measure)
  axes = ['method']
  plots = [report.bar_plot_of(settings, records, axes, 'distinct_2', ylabel='distinct-2',
                              title='Distinct word bigrams of greedy replies',
                              file='distinct.png')]
  report.write(
      settings, records, title='Repetition: a reward against it, or a penalty at decoding',
      intro=f'Greedy replies of at most {reply_tokens} tokens to the '
            f'{len(task.val)} held-out prompts (a line of code; the reply continues it) of '
            f'the SFT run {sft} ({settings.value("warm_start_steps")} steps).',
      axes=axes, plots=plots,
      columns=[report.Column('distinct_1', 'distinct-1'),
               report.Column('distinct_2', 'distinct-2'),
               report.Column('repeats', 'repeated bigrams per reply', 2),
               report.Column('words', 'words per reply', 1),
               report.Column('kl', 'KL to SFT (nats/reply)')])


main = grid.entry_point(run)

if __name__ == '__main__':
  app.run(main)
