"""What the online objectives (training/online.py) sample and judge: prompts, rewards, and
completions drawn from the policy with the jitted KV-cache generate (models/generation.py).

Prompts: --data is a JSONL file of {"prompt": str} lines (other keys are ignored), or
synthetic:arithmetic's problems (data/arithmetic.py). A prompt is the user turn of a
conversation, rendered with the chat template and its generation prompt; its completion is
what the policy writes after it, through its end-of-turn token (or max_tokens of them).

Rewards (--reward): `module:function`, a Python function(prompt: str, completion: str) ->
number, imported with the working directory first on the path; or the workdir of a reward
model (--objective=reward), which scores the prompt and completion as it scored a pair's
sides, at the last token. synthetic:arithmetic's default is its exact checker.

Generation takes one prompt length per call (it has no padding), so a step draws its prompts
from one length: a length with probability proportional to its number of prompts, then
prompts of that length, so that each prompt is as likely as in a uniform draw.
"""
import importlib
import math
import os
import sys

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from lmlab.data import arithmetic, chat
from lmlab.data.chat_template import render
from lmlab.data.errors import DataError
from lmlab.models.errors import ConfigError
from lmlab.models.generation import SamplingConfig, make_generate
from lmlab.models.registry import abstract_model
from lmlab.training.preference import last_token_scores
from lmlab.training.restored import restore
from lmlab.training.workdir import config_path


def read_prompts(data: str) -> list[str]:
  """The prompts of a JSONL file of {"prompt": str} lines, or of synthetic:arithmetic."""
  if data == arithmetic.SYNTHETIC:
    return [arithmetic.prompt_of(a, b) for a, b in arithmetic.problems()]
  prompts = []
  for where, example in chat.json_lines(data, 'prompts'):
    prompt = example.get('prompt') if isinstance(example, dict) else None
    if not (isinstance(prompt, str) and prompt.strip()):
      raise DataError(f'{where}: expected an object with a non-empty "prompt" string')
    prompts.append(prompt)
  return prompts


class PythonReward:
  """A reward function named module:function."""

  def __init__(self, spec: str):
    self.spec = spec
    module_name, colon, name = spec.partition(':')
    if not (colon and module_name and name):
      raise ConfigError(f'--reward={spec!r} is neither module:function nor a reward model\'s '
                        'workdir')
    sys.path.insert(0, os.getcwd())
    try:
      module = importlib.import_module(module_name)
    except Exception as error:  # Whatever the module raises on import is the user's to see.
      raise ConfigError(f'--reward={spec}: importing {module_name!r} failed '
                        f'({type(error).__name__}: {error})') from None
    finally:
      sys.path.remove(os.getcwd())
    self.function = getattr(module, name, None)
    if not callable(self.function):
      raise ConfigError(f'--reward={spec}: module {module_name!r} has no function {name!r}')

  def __call__(self, prompts, completions, tokens_bs, lengths_b) -> np.ndarray:
    del tokens_bs, lengths_b
    rewards = []
    for prompt, completion in zip(prompts, completions):
      try:
        value = self.function(prompt, completion)
      except Exception as error:
        raise DataError(f'--reward={self.spec} raised {type(error).__name__} ({error}) on '
                        f'prompt {prompt!r:.40}') from None
      if isinstance(value, bool) or not isinstance(value, (int, float, np.number)) or not (
          math.isfinite(value)):
        raise DataError(f'--reward={self.spec} returned {value!r:.40} on prompt '
                        f'{prompt!r:.40}; a reward is a finite number')
      rewards.append(float(value))
    return np.asarray(rewards, np.float32)


class ModelReward:
  """The score of a reward model's run (its latest checkpoint) at each sequence's last token;
  it must share the policy's tokenizer."""

  def __init__(self, workdir: str, tokenizer):
    loaded = restore(workdir)
    config = nnx.merge(loaded.graphdef, loaded.params).config
    if config.n_labels != 1:
      raise ConfigError(f'--reward={workdir} is not a reward model (n_labels={config.n_labels}); '
                        'train one with --objective=reward')
    if loaded.tokenizer.n_vocab != tokenizer.n_vocab:
      raise ConfigError(f'--reward={workdir} has a tokenizer of {loaded.tokenizer.n_vocab} '
                        f'tokens, the policy one of {tokenizer.n_vocab}; they must be the same')
    self.params = loaded.params
    self.score = jax.jit(lambda params, tokens_bs, lengths_b: last_token_scores(
        nnx.merge(loaded.graphdef, params), tokens_bs, lengths_b))

  def __call__(self, prompts, completions, tokens_bs, lengths_b) -> np.ndarray:
    del prompts, completions
    return np.asarray(self.score(self.params, jnp.asarray(tokens_bs), jnp.asarray(lengths_b)))


def load_reward(spec: str | None, data: str, tokenizer, prompt: str):
  """The reward --reward names (see the module docstring). A Python function is tried on
  `prompt` with an empty completion (which the policy may write), so that one that cannot
  judge it stops the run before it writes."""
  if not spec:
    if data != arithmetic.SYNTHETIC:
      raise ConfigError('this objective needs --reward=module:function (or a reward model\'s '
                        'workdir) to judge completions')
    spec = 'lmlab.data.arithmetic:reward'
  if os.path.isdir(spec):
    if not os.path.exists(config_path(spec)):
      raise ConfigError(f'--reward={spec} is a folder without a training run\'s config.json')
    return ModelReward(spec, tokenizer)
  reward = PythonReward(spec)
  reward([prompt], [''], None, None)
  return reward


class Sampler:
  """Completions of prompts drawn from a policy: sample(params, prompt_ids, key) ->
  (sequences [B, seq_len] of prompt and completion, the completion mask, lengths [B], the
  completions' texts)."""

  def __init__(self, model_config, tokenizer, template, *, max_tokens: int, temperature: float,
               seq_len: int, repetition_penalty: float = 1.0):
    self.tokenizer, self.template, self.seq_len = tokenizer, template, seq_len
    self.end_token = tokenizer.encode_single_token(template.end_token)
    self.generate = make_generate(
        nnx.graphdef(abstract_model(model_config)),
        SamplingConfig(max_new_tokens=max_tokens, temperature=temperature,
                       repetition_penalty=repetition_penalty),
        end_token=self.end_token, n_valid=tokenizer.n_vocab)

  def prompt_ids(self, prompt: str) -> list[int]:
    text = render(self.template, [{'role': 'user', 'content': prompt}],
                  add_generation_prompt=True)
    return self.tokenizer.encode(text, allowed_special=set(self.template.special_tokens),
                                 disallowed_special=())

  def sample(self, params, prompt_ids_bt: np.ndarray, key):
    b, t = prompt_ids_bt.shape
    new_bl = np.asarray(jax.device_get(self.generate(params, jnp.asarray(prompt_ids_bt), key)))
    ends = [list(row).index(self.end_token) + 1 if self.end_token in row else len(row)
            for row in new_bl]
    sequences = np.zeros((b, self.seq_len), np.int32)
    mask = np.zeros((b, self.seq_len), np.int32)
    sequences[:, :t] = prompt_ids_bt
    for row, n in enumerate(ends):
      sequences[row, t:t + n] = new_bl[row, :n]
      mask[row, t:t + n] = 1
    texts = [self.tokenizer.decode(row[:n - (row[n - 1] == self.end_token)].tolist(),
                                   errors='replace') for row, n in zip(new_bl, ends)]
    return sequences, mask, t + np.asarray(ends, np.int32), texts


class PromptDraws:
  """The prompts that fit (their rendering plus max_tokens within seq_len) grouped by length;
  draw(rng, count) -> `count` indices of one length (see the module docstring)."""

  def __init__(self, prompt_ids: list[list[int]]):
    self.by_length = {}
    for index, ids in enumerate(prompt_ids):
      self.by_length.setdefault(len(ids), []).append(index)
    self.lengths = sorted(self.by_length)
    sizes = np.asarray([len(self.by_length[n]) for n in self.lengths], np.float64)
    self.weights = sizes / sizes.sum()

  def draw(self, rng: np.random.Generator, count: int) -> np.ndarray:
    length = self.lengths[rng.choice(len(self.lengths), p=self.weights)]
    return np.asarray(self.by_length[length])[rng.integers(0, len(self.by_length[length]),
                                                           count)]
