r"""Alignment methods side by side on a task whose reward is exact: sums of two numbers.

  python experiments/alignment.py                      # quick: about 9 minutes on 2 CPU cores
  python experiments/alignment.py --algorithms=sft,dpo,grpo --seeds=2 --steps=80
  python experiments/alignment.py --scale=full         # a GPU or TPU

A small model is first fine-tuned with --objective=sft on synthetic:arithmetic ('a+b=' ->
the sum, operands 0..99; data/arithmetic.py) for --warm_start_steps, to a weak accuracy, in
<out>/sft. Every method then starts from it, with it as the frozen reference, for --steps:
  sft      the starting point itself, measured
  sft_more the control: SFT continued for --steps at --policy_learning_rate, which every
           method must beat to show it did more than train longer
  rsft     rejection-sampling fine-tuning: the best of several samples per prompt, kept
           when it is right (--min_reward=1); --samples_per_prompt samples
  dpo      DPO on preference pairs (--dpo_pairs): the sum chosen, a wrong reply rejected
  ipo      IPO on the same pairs
  simpo    SimPO on the same pairs, without a reference
  rpo      DPO plus the chosen replies' negative log-likelihood (--rpo_alpha=1; Pang et
           al. 2024), on the same pairs
  ppo      PPO with the exact checker as the reward (or, with --ppo_reward=model, a reward
           model trained here on the pairs for --reward_steps)
  grpo     GRPO with the exact checker, --samples_per_prompt completions per prompt
--dpo_pairs=sampled (the default) rejects a reply the SFT model samples, wrong by the checker:
one pair per training problem whose sample is wrong (<out>/sampled_pairs.jsonl), the
on-policy data the DPO paper prescribes (pairs drawn from the reference). near_miss rejects
data/arithmetic.py's made-up near miss (the sum off by 1 to 10, or one digit changed).
Per run: held-out accuracy (the greedy reply to each of the 500 held-out prompts is the sum),
KL to the SFT model (the summed log-ratio of one sampled reply per held-out prompt), and the
wall time of its steps.

What to expect: Rafailov et al. (2023) find DPO matching or beating PPO (sentiment control:
a better reward at every KL; summarisation and dialogue: higher win rates) at a fraction of
the compute, since it needs no sampling, reward model or value function. Shao et al. (2024)
report GRPO raising DeepSeekMath-Instruct 7B from 82.9% to 88.2% on GSM8K without a value
model; Liu et al. (2025, Dr. GRPO) find its length normalisation biases replies to grow.
Pang et al. (2024) find DPO alone failing on math reasoning (the chosen replies' likelihood
falls with the rejected ones') and the NLL term of RPO needed.
Touvron et al. (2023, Llama 2) use rejection sampling before PPO and find it a strong
baseline.

Writes to --out: sampled_pairs.jsonl (with --dpo_pairs=sampled), results.csv, results.md,
accuracy_kl.png and accuracy.png.
"""
import dataclasses
import json
import os
import time

from absl import app, flags
from flax import nnx

from lmlab.data import arithmetic
from lmlab.experiments import grid, report, stages
from lmlab.models.registry import without_value_head
from lmlab.training import run as run_lib
from lmlab.training.config import ONLINE_OBJECTIVES
from lmlab.training.online import GroupRelative

METHODS = ('sft', 'sft_more', 'rsft', 'dpo', 'ipo', 'simpo', 'rpo', 'ppo', 'grpo')
flags.DEFINE_list('algorithms', list(METHODS), f'Methods among {", ".join(METHODS)}.')
flags.DEFINE_float('dpo_learning_rate', 1e-5, 'Peak learning rate of dpo, ipo and simpo.')
flags.DEFINE_float('rpo_learning_rate', 3e-5, 'Peak learning rate of rpo.')
flags.DEFINE_enum('dpo_pairs', 'sampled', ['sampled', 'near_miss'], 'The rejected reply of the '
                  'DPO family\'s pairs: a wrong sample of the SFT model, or a made-up near miss.')
flags.DEFINE_enum('ppo_reward', 'exact', ['exact', 'model'], 'What judges PPO\'s samples: the '
                  'exact checker, or a reward model trained here on the preference pairs.')
flags.DEFINE_integer('reward_steps', 4000, '--ppo_reward=model: steps of the reward model.')

FLAGS = flags.FLAGS
SCRIPT_DEFAULTS = {
    'quick': dict(seeds=3, warm_start_steps=200, steps=100, batch_size=64, seq_len=40,
                  d_model=64, n_layers=[2], learning_rate=[3e-3], warmup_steps=[10],
                  eval_every=1000, save_every=1000),
    'full': dict(warm_start_steps=1000, steps=400, batch_size=64, seq_len=48, d_model=256,
                 n_layers=[4]),
}
# What each method trains: its objective and TrainConfig fields ('sft' trains nothing).
METHOD_FIELDS = {'sft_more': ('sft', {}), 'rsft': ('rsft', dict(min_reward=1.0)),
                 'dpo': ('dpo', dict(dpo_loss='sigmoid')), 'ipo': ('dpo', dict(dpo_loss='ipo')),
                 'simpo': ('dpo', dict(dpo_loss='simpo')),
                 'rpo': ('dpo', dict(dpo_loss='sigmoid', rpo_alpha=1.0)), 'ppo': ('ppo', {}),
                 'grpo': ('grpo', {})}
COMPLETION_TOKENS = 6  # A sum has at most 3 digits, then the end-of-turn token.


def judge(task: GroupRelative):
  """evaluate(params) -> held-out accuracy and KL to the reference."""

  def evaluate(model_config, params) -> dict:
    policy = without_value_head(nnx.merge(grid.graphdef_of(model_config), params))
    metrics = task.evaluate(*nnx.split(policy))
    return {'accuracy': metrics['eval_reward'], 'kl': metrics['eval_kl']}

  return evaluate


def sampled_pairs(task: GroupRelative, path: str) -> str:
  """Writes one pair per training problem whose reply sampled from the reference is wrong:
  the sum chosen, that reply rejected."""
  replies = task.sample_replies(task.reference, task.train, seed=0)
  with open(path, 'w') as f:
    for i, reply in replies.items():
      prompt = task.prompts[i]
      if reply.strip() and not arithmetic.reward(prompt, reply):
        f.write(json.dumps({'prompt': prompt, 'chosen': str(arithmetic.answer(prompt)),
                            'rejected': reply}) + '\n')
  return path


def run():
  settings = grid.Settings('alignment', SCRIPT_DEFAULTS, data=arithmetic.SYNTHETIC)
  axes = {'method': settings.values('algorithms', choices=METHODS)}
  seq_len, batch_size = settings.value('seq_len'), settings.value('batch_size')
  started = time.perf_counter()
  sft = stages.train_stage(settings, 'sft', 'sft', settings.value('warm_start_steps'),
                           settings.common_axes['learning_rate'][0], arithmetic.SYNTHETIC)
  sft_seconds = time.perf_counter() - started
  reward = None
  if 'ppo' in axes['method'] and FLAGS.ppo_reward == 'model':
    reward = stages.train_stage(settings, 'reward', 'reward', FLAGS.reward_steps, 2e-3,
                                arithmetic.SYNTHETIC, init_from=sft)
  task = stages.reference_task(sft, arithmetic.SYNTHETIC, seq_len, COMPLETION_TOKENS)
  evaluate = judge(task)
  pairs = arithmetic.SYNTHETIC
  uses_pairs = any(METHOD_FIELDS.get(m, ('',))[0] == 'dpo' for m in axes['method'])
  if FLAGS.dpo_pairs == 'sampled' and uses_pairs:
    pairs = sampled_pairs(task, os.path.join(settings.out, 'sampled_pairs.jsonl'))
  steps = settings.value('steps')

  def configure(cell, setup):
    objective, fields = METHOD_FIELDS[cell['method']]
    model, tokenizer, init_params = run_lib.init_from(sft, [])
    if objective in ONLINE_OBJECTIVES:
      fields = dict(fields, completion_tokens=COMPLETION_TOKENS,
                    group_size=FLAGS.samples_per_prompt)
    if objective == 'rsft':  # batch_size prompts, samples_per_prompt samples of each.
      fields['batch_size'] = max(1, batch_size // FLAGS.samples_per_prompt)
    if cell['method'] == 'ppo' and reward:
      fields['reward'] = reward
    learning_rate = (FLAGS.rpo_learning_rate if cell['method'] == 'rpo' else
                     FLAGS.dpo_learning_rate if objective == 'dpo' else FLAGS.policy_learning_rate)
    return dataclasses.replace(
        setup, model=model, init_params=init_params, init_description=f'{sft}',
        train=dataclasses.replace(setup.train, objective=objective,
                                  data=pairs if objective == 'dpo' else arithmetic.SYNTHETIC,
                                  tokenizer=tokenizer, steps=steps, **fields),
        optimizer=dataclasses.replace(setup.optimizer, learning_rate=learning_rate,
                                      warmup_steps=max(1, steps // 10), total_steps=steps))

  def measure(trained):
    return {} if trained.params is None else evaluate(trained.model, trained.params)

  trained = [cell for cell in settings.cells(axes) if cell['method'] != 'sft']
  records = grid.run(settings, trained, configure, measure) if trained else []
  for record in records:  # The median step (sampling included) times the steps taken.
    record['wall_s'] = record['step_ms'] * record['train_steps'][-1] / 1e3
  if 'sft' in axes['method']:  # The starting point: measured once, as it does not vary.
    loaded = run_lib.restore(sft)
    records.insert(0, {**settings.cells({'method': ['sft']})[0], 'seed': 0, 'wall_s': 0.0,
                       **evaluate(nnx.merge(loaded.graphdef, loaded.params).config,
                                  loaded.params)})
  shown = settings.shown_axes(axes)
  plots = [report.scatter_plot(settings, records, shown, 'kl', 'accuracy',
                               xlabel='KL to the SFT model (nats per reply)',
                               ylabel='held-out accuracy', title='Accuracy against KL',
                               file='accuracy_kl.png'),
           report.bar_plot_of(settings, records, shown, 'accuracy', ylabel='held-out accuracy',
                              title='Held-out accuracy', file='accuracy.png')]
  report.write(
      settings, records, title='Alignment methods on exact-reward arithmetic',
      intro=f'Each method starts from the SFT run {sft} '
            f'({settings.value("warm_start_steps")} steps, {sft_seconds:.0f} s) on sums of two '
            'numbers 0..99 and is measured on the 500 held-out problems: greedy accuracy, and '
            'the KL to the SFT model of one sampled reply per problem.',
      axes=shown, plots=plots,
      columns=[report.Column('accuracy', 'held-out accuracy'),
               report.Column('kl', 'KL to SFT (nats/reply)'),
               report.Column('wall_s', 'wall time of its steps (s)', 1),
               report.Column('step_ms', 'ms/step', 1)])


main = grid.entry_point(run)

if __name__ == '__main__':
  app.run(main)
