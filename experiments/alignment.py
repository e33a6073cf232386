r"""Alignment methods side by side on a task whose reward is exact: sums of two numbers.

  python experiments/alignment.py                      # quick: about 11 minutes on 2 CPU cores
  python experiments/alignment.py --algorithms=sft,dpo,grpo --seeds=2 --steps=80
  python experiments/alignment.py --scale=full         # a GPU or TPU

A small model is first fine-tuned with --objective=sft on synthetic:arithmetic ('a+b=' ->
the sum, operands 0..99; data/arithmetic.py) for --warm_start_steps, to a weak accuracy, in
<out>/sft. Every method then starts from it, with it as the frozen reference, for --steps:
  sft      the starting point itself, measured
  rsft     rejection-sampling fine-tuning: the best of several samples per prompt, kept
           when it is right (--min_reward=1); --samples_per_prompt samples
  dpo      DPO on the task's preference pairs (the sum against a near miss)
  ipo      IPO on the same pairs
  simpo    SimPO on the same pairs, without a reference
  ppo      PPO with the exact checker as the reward (or, with --ppo_reward=model, a reward
           model trained here on the pairs for --reward_steps)
  grpo     GRPO with the exact checker, --samples_per_prompt completions per prompt
Per run: held-out accuracy (the greedy reply to each of the 500 held-out prompts is the sum),
KL to the SFT model (the summed log-ratio of one sampled reply per held-out prompt), and the
wall time of its steps.

What to expect: Rafailov et al. (2023) find DPO matching or beating PPO (sentiment control:
a better reward at every KL; summarisation and dialogue: higher win rates) at a fraction of
the compute, since it needs no sampling, reward model or value function. Shao et al. (2024)
report GRPO raising DeepSeekMath-Instruct 7B from 82.9% to 88.2% on GSM8K without a value
model; Liu et al. (2025, Dr. GRPO) find its length normalisation biases replies to grow.
Touvron et al. (2023, Llama 2) use rejection sampling before PPO and find it a strong
baseline.

Writes to --out: results.csv, results.md, accuracy_kl.png and accuracy.png.
"""
import dataclasses
import os
import time

from absl import app, flags
from flax import nnx

from lmlab.data import arithmetic
from lmlab.experiments import grid, report
from lmlab.models.registry import without_value_head
from lmlab.training import loop
from lmlab.training import run as run_lib
from lmlab.training.config import TrainConfig
from lmlab.training.online import GroupRelative
from lmlab.training.optimizer import OptimizerConfig

METHODS = ('sft', 'rsft', 'dpo', 'ipo', 'simpo', 'ppo', 'grpo')
flags.DEFINE_list('algorithms', list(METHODS), f'Methods among {", ".join(METHODS)}.')
flags.DEFINE_integer('warm_start_steps', None, 'Steps of the SFT run every method starts '
                     'from.')
flags.DEFINE_float('policy_learning_rate', 1e-4, 'Peak learning rate of rsft, ppo and grpo.')
flags.DEFINE_float('dpo_learning_rate', 1e-5, 'Peak learning rate of dpo, ipo and simpo.')
flags.DEFINE_integer('samples_per_prompt', 8, 'grpo: completions per prompt; rsft: samples per '
                     'prompt.')
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
METHOD_FIELDS = {'rsft': ('rsft', dict(min_reward=1.0)),
                 'dpo': ('dpo', dict(dpo_loss='sigmoid')), 'ipo': ('dpo', dict(dpo_loss='ipo')),
                 'simpo': ('dpo', dict(dpo_loss='simpo')), 'ppo': ('ppo', {}),
                 'grpo': ('grpo', {})}
COMPLETION_TOKENS = 6  # A sum has at most 3 digits, then the end-of-turn token.
JUDGED_PER_BATCH = 100  # Held-out prompts decoded at once in the measurements.


def train_stage(settings, name: str, objective: str, steps: int, learning_rate: float,
                init_from: str | None = None, **fields) -> str:
  """A run every method shares (the SFT model, the reward model), in <out>/<name>, trained
  once (resumed when interrupted)."""
  workdir = os.path.join(settings.out, name)
  setup = settings.base_setup({k: v[0] for k, v in settings.common_axes.items()}, seed=0)
  model, init_params, train = setup.model, None, setup.train
  if init_from:
    model, tokenizer, init_params = run_lib.init_from(init_from, [])
    train = dataclasses.replace(train, tokenizer=tokenizer)
  print(f'training {name} in {workdir}', flush=True)
  loop.train(dataclasses.replace(train, workdir=workdir, objective=objective,
                                 data=arithmetic.SYNTHETIC, steps=steps, **fields),
             model, OptimizerConfig(learning_rate=learning_rate, warmup_steps=steps // 10,
                                    total_steps=steps),
             init_params=init_params, print_fn=lambda *_: None)
  return workdir


def judge(sft: str, seq_len: int):
  """evaluate(params) -> held-out accuracy and KL to the SFT run's parameters."""
  loaded = run_lib.restore(sft)
  config = TrainConfig(workdir=sft, objective='grpo', data=arithmetic.SYNTHETIC,
                       tokenizer=loaded.run.tokenizer, seq_len=seq_len,
                       batch_size=JUDGED_PER_BATCH, group_size=2,
                       completion_tokens=COMPLETION_TOKENS)
  model_config = nnx.merge(loaded.graphdef, loaded.params).config
  task = GroupRelative(config.resolved(model_config).validate(), model_config,
                       log=lambda *_: None)
  task.reference = loaded.params

  def evaluate(model_config, params) -> dict:
    policy = without_value_head(nnx.merge(grid.graphdef_of(model_config), params))
    metrics = task.evaluate(*nnx.split(policy))
    return {'accuracy': metrics['eval_reward'], 'kl': metrics['eval_kl']}

  return evaluate


def run():
  settings = grid.Settings('alignment', SCRIPT_DEFAULTS, data=arithmetic.SYNTHETIC)
  axes = {'method': settings.values('algorithms', choices=METHODS)}
  seq_len, batch_size = settings.value('seq_len'), settings.value('batch_size')
  started = time.perf_counter()
  sft = train_stage(settings, 'sft', 'sft', settings.value('warm_start_steps'),
                    settings.common_axes['learning_rate'][0])
  sft_seconds = time.perf_counter() - started
  reward = None
  if 'ppo' in axes['method'] and FLAGS.ppo_reward == 'model':
    reward = train_stage(settings, 'reward', 'reward', FLAGS.reward_steps, 2e-3, init_from=sft)
  evaluate = judge(sft, seq_len)
  steps = settings.value('steps')

  def configure(cell, setup):
    objective, fields = METHOD_FIELDS[cell['method']]
    model, tokenizer, init_params = run_lib.init_from(sft, [])
    online = objective in ('rsft', 'ppo', 'grpo')
    if online:
      fields = dict(fields, completion_tokens=COMPLETION_TOKENS,
                    group_size=FLAGS.samples_per_prompt)
    if objective == 'rsft':  # batch_size prompts, samples_per_prompt samples of each.
      fields['batch_size'] = max(1, batch_size // FLAGS.samples_per_prompt)
    if cell['method'] == 'ppo' and reward:
      fields['reward'] = reward
    learning_rate = FLAGS.policy_learning_rate if online else FLAGS.dpo_learning_rate
    return dataclasses.replace(
        setup, model=model, init_params=init_params, init_description=f'{sft}',
        train=dataclasses.replace(setup.train, objective=objective, data=arithmetic.SYNTHETIC,
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
