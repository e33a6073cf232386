"""lmlab as an lm-evaluation-harness backend (`pip install 'lmlab[eval]'`): the harness's
tasks run on a training run's latest checkpoint or on a Hugging Face folder.

  lmlab-eval run --model lmlab --model_args workdir=runs/tiny --tasks <task> ...
  lmlab-eval run --model lmlab --model_args hf_checkpoint=path/to/Qwen2-0.5B,batch_size=16 ...

`lmlab-eval` is lm-eval's own command line with this backend registered under the name
`lmlab` (lm-eval has no plugin discovery: a backend registers itself when imported). In
Python, `lm_eval.simple_evaluate(model=LmlabLM(workdir=...), tasks=...)`.

Model arguments: workdir or hf_checkpoint; tokenizer (default: the run's, or the folder's
tokenizer.json); batch_size (requests per compiled call, default 8); max_length (tokens the
model reads at once, default its max_seq_len); max_gen_toks (default 256); seed (of sampled
generations). Log-likelihoods come from training/scoring.py, which follows the harness's
conventions; generations from the jitted KV-cache decoder, greedy unless the task samples,
contexts of one length batched together, each cut at the task's stop strings.

Only this module imports lm_eval.
"""
import json
import os

import jax
import jax.numpy as jnp
from flax import nnx
# The harness's own backends are registered first: its registry loads them only when it is
# empty at first use, so registering ours alone would hide them.
import lm_eval.models  # noqa: F401
from lm_eval.api.model import LM
from lm_eval.api.registry import register_model

from lmlab.data import tokenizer as tokenizer_lib
from lmlab.models.errors import ConfigError
from lmlab.models.generation import SamplingConfig
from lmlab.training import run as run_lib
from lmlab.training import scoring
from lmlab.training.config import TrainConfig

SAMPLING_KWARGS = ('do_sample', 'temperature', 'top_k', 'top_p', 'until', 'max_gen_toks')


def _prefix_token(hf_checkpoint: str | None, tokenizer) -> int:
  """What an empty context is: a Hugging Face model's BOS (else its EOS), as the harness's
  hf backend takes it; a run's end-of-text token."""
  if hf_checkpoint:
    with open(os.path.join(hf_checkpoint, 'config.json')) as f:
      config = json.load(f)
    for name in ('bos_token_id', 'eos_token_id'):
      value = config.get(name)
      value = value[0] if isinstance(value, list) and value else value
      if isinstance(value, int):
        return value
  return tokenizer_lib.separator_id(tokenizer)


@register_model('lmlab')
class LmlabLM(LM):
  """The harness's three request types over a loaded lmlab model."""

  def __init__(self, workdir: str | None = None, hf_checkpoint: str | None = None,
               tokenizer: str | None = None, batch_size: int | str | None = 8,
               max_length: int | None = None, max_gen_toks: int = 256, seed: int = 0,
               **ignored):
    super().__init__()
    del ignored  # The harness also passes device and max_batch_size; JAX places the model.
    if bool(workdir) == bool(hf_checkpoint):
      raise ConfigError('lmlab model_args: give workdir=<run> or hf_checkpoint=<folder>')
    # A Hugging Face folder's tokenizer is read from the folder; nothing is written.
    run = TrainConfig(workdir=workdir or run_lib.default_workdir('', hf_checkpoint))
    self.loaded = run_lib.load(run, hf_checkpoint, [], tokenizer)
    config = nnx.merge(self.loaded.graphdef, self.loaded.params).config
    scoring.check_decoder(config, 'the lmlab lm-eval backend')
    self.tokenizer = self.loaded.tokenizer
    self.batch_size = 8 if batch_size in (None, 'auto') else int(batch_size)
    self.max_length = int(max_length or config.max_seq_len)
    self.max_gen_toks, self.seed = int(max_gen_toks), int(seed)
    self.prefix = _prefix_token(hf_checkpoint, self.tokenizer)
    self.end = self.loaded.sample_end
    self.scorer = scoring.Scorer(self.loaded.graphdef, self.loaded.params,
                                 batch_size=self.batch_size, max_len=self.max_length)

  def loglikelihood(self, requests, disable_tqdm: bool = False):
    scores = self.scorer([scoring.pair(self.tokenizer, context, continuation, self.prefix)
                          for context, continuation in (r.args for r in requests)])
    return [(s.logprob, s.greedy) for s in scores]

  def loglikelihood_rolling(self, requests, disable_tqdm: bool = False):
    windows = [scoring.rolling(self.tokenizer.encode_ordinary(text), self.max_length,
                               self.prefix) for (text,) in (r.args for r in requests)]
    scores = iter(self.scorer([w for ws in windows for w in ws]))
    return [sum(next(scores).logprob for _ in ws) for ws in windows]

  def _sampling(self, gen_kwargs: dict) -> tuple[SamplingConfig, list[str]]:
    """A task's generation settings: greedy unless do_sample; stop strings."""
    unknown = sorted(set(gen_kwargs) - set(SAMPLING_KWARGS))
    if unknown:
      raise ConfigError(f'the lmlab backend does not know the generation settings {unknown}; '
                        f'it takes {", ".join(SAMPLING_KWARGS)}')
    until = gen_kwargs.get('until') or []
    sample = bool(gen_kwargs.get('do_sample'))
    sampling = SamplingConfig(
        max_new_tokens=int(gen_kwargs.get('max_gen_toks') or self.max_gen_toks),
        temperature=float(gen_kwargs.get('temperature', 1.0)) if sample else 0.0,
        top_k=int(gen_kwargs.get('top_k') or 0), top_p=float(gen_kwargs.get('top_p') or 1.0))
    return sampling, [s for s in ([until] if isinstance(until, str) else until) if s]

  def generate_until(self, requests, disable_tqdm: bool = False):
    groups = {}
    for i, (context, gen_kwargs) in enumerate(r.args for r in requests):
      sampling, until = self._sampling(gen_kwargs)
      room = max(1, self.max_length - sampling.max_new_tokens)
      tokens = tuple(self.tokenizer.encode_ordinary(context)[-room:] or [self.prefix])
      groups.setdefault((sampling, len(tokens)), []).append((i, tokens, until))
    texts = [None] * len(requests)
    for (sampling, _), members in sorted(groups.items(), key=lambda g: -g[0][1]):
      generate = run_lib.generator(self.loaded.graphdef, sampling, end_token=self.end,
                                   n_valid=self.tokenizer.n_vocab)
      for start in range(0, len(members), self.batch_size):
        chunk = members[start:start + self.batch_size]
        key = jax.random.fold_in(jax.random.key(self.seed), chunk[0][0])
        new_bt = jax.device_get(generate(self.loaded.params,
                                         jnp.asarray([tokens for _, tokens, _ in chunk]), key))
        for (i, _, until), new in zip(chunk, new_bt.tolist()):
          text = run_lib.text_until(self.tokenizer, new, self.end)
          for stop in until:
            text = text.split(stop)[0]
          texts[i] = text
    return texts


def command_line():
  """lm-eval's command line, this backend registered (training/lm_eval_command.py)."""
  from lm_eval.__main__ import cli_evaluate
  cli_evaluate()
