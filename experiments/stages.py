"""What the post-training experiments (alignment.py, repetition.py) build on: a starting run
that every method shares, trained once, and the online task that samples and judges replies
to its prompts with that run as the reference."""
import dataclasses
import os

from absl import flags
from flax import nnx

from lmlab.training import loop
from lmlab.training import run as run_lib
from lmlab.training.config import TrainConfig
from lmlab.training.online import GroupRelative
from lmlab.training.optimizer import OptimizerConfig

JUDGED_PER_BATCH = 100  # Held-out prompts decoded at once in the measurements.

# The flags both scripts take (absl allows one definition of each per process).
flags.DEFINE_integer('warm_start_steps', None, 'Steps of the SFT run every method starts '
                     'from.')
flags.DEFINE_float('policy_learning_rate', 1e-4, 'Peak learning rate of the methods that '
                   'sample from the policy (grpo, ppo, rsft) and of alignment\'s sft_more.')
flags.DEFINE_integer('samples_per_prompt', 8, 'grpo: completions per prompt; rsft: samples per '
                     'prompt.')


def train_stage(settings, name: str, objective: str, steps: int, learning_rate: float, data: str,
                init_from: str | None = None, **fields) -> str:
  """A run the methods share (an SFT model, a reward model), in <out>/<name>, trained once
  (resumed when interrupted)."""
  workdir = os.path.join(settings.out, name)
  setup = settings.base_setup({k: v[0] for k, v in settings.common_axes.items()}, seed=0)
  model, init_params, train = setup.model, None, setup.train
  if init_from:
    model, tokenizer, init_params = run_lib.init_from(init_from, [])
    train = dataclasses.replace(train, tokenizer=tokenizer)
  print(f'training {name} in {workdir}', flush=True)
  loop.train(dataclasses.replace(train, workdir=workdir, objective=objective, data=data,
                                 steps=steps, **fields),
             model, OptimizerConfig(learning_rate=learning_rate, warmup_steps=steps // 10,
                                    total_steps=steps),
             init_params=init_params, print_fn=lambda *_: None)
  return workdir


def reference_task(workdir: str, data: str, seq_len: int, completion_tokens: int,
                   reward: str | None = None) -> GroupRelative:
  """The prompts of `data`, their reward and samplers, with the run in workdir (its latest
  checkpoint) as the reference."""
  loaded = run_lib.restore(workdir)
  config = TrainConfig(workdir=workdir, objective='grpo', data=data, reward=reward,
                       tokenizer=loaded.run.tokenizer, seq_len=seq_len,
                       batch_size=JUDGED_PER_BATCH, group_size=2,
                       completion_tokens=completion_tokens)
  model_config = nnx.merge(loaded.graphdef, loaded.params).config
  task = GroupRelative(config.resolved(model_config).validate(), model_config,
                       log=lambda *_: None)
  task.reference = loaded.params
  return task
