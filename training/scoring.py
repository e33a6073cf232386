"""Log-likelihoods of continuations under a decoder, batched and jitted: what the built-in
evaluation tasks (training/eval_tasks.py) and the lm-evaluation-harness backend
(training/lm_eval_model.py) are made of.

  requests = [pair(tokenizer, 'The capital of France is', ' Paris', prefix), ...]
  scores = Scorer(graphdef, params, batch_size=8, max_len=1024)(requests)
  scores[0].logprob, scores[0].greedy   # sum of log p(continuation | context); argmax all along

A request is a token sequence whose last `n_scored` tokens are scored given the ones before.
Requests longer than max_len + 1 tokens lose their oldest context (the scored tokens are kept
whole when they fit). The conventions are lm-evaluation-harness's, so that the two agree:
whitespace that ends a context belongs to the continuation, an empty context is the prefix
token, and a long text is scored in disjoint windows that each see as much of the text before
them as fits (`rolling`).
"""
import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from lmlab.models.errors import ConfigError

# Padded lengths are multiples of this, so that few shapes are compiled.
LENGTH_STEP = 32


@dataclasses.dataclass(frozen=True)
class Request:
  tokens: tuple[int, ...]
  n_scored: int


@dataclasses.dataclass(frozen=True)
class Score:
  logprob: float  # Sum over the scored tokens of log p(token | the tokens before), in nats.
  greedy: bool    # Every scored token is the model's most likely next token.


def pair(tokenizer, context: str, continuation: str, prefix_token: int) -> Request:
  """The request scoring `continuation` after `context`: the pair is encoded whole and the
  context's tokens are cut off, so that the tokens at the seam are the ones the whole text
  has."""
  stripped = context.rstrip()
  continuation = context[len(stripped):] + continuation
  whole = tokenizer.encode_ordinary(stripped + continuation)
  n_context = len(tokenizer.encode_ordinary(stripped))
  scored = whole[n_context:]
  if not scored:
    raise ValueError(f'continuation {continuation!r} has no tokens of its own')
  if n_context == 0:
    return Request((prefix_token, *scored), len(scored))
  return Request(tuple(whole), len(scored))


def rolling(tokens: list[int], max_len: int, prefix_token: int) -> list[Request]:
  """Requests that score every token of `tokens` once: the first window starts after the
  prefix token, each later one predicts up to max_len new tokens from the max_len + 1 tokens
  that end it."""
  if not tokens:
    return []
  first = min(max_len, len(tokens))
  requests = [Request((prefix_token, *tokens[:first]), first)]
  done = first
  while done < len(tokens):
    n = min(max_len, len(tokens) - done)
    end = done + n
    requests.append(Request(tuple(tokens[max(0, end - max_len - 1):end]), n))
    done = end
  return requests


@functools.lru_cache(maxsize=4)
def _score_batch(graphdef):
  """(params, inputs [B, L], targets [B, L], scored [B, L]) -> (sum log p [B], greedy [B])."""

  def score(params, inputs_bl, targets_bl, scored_bl):
    logits_blv = nnx.merge(graphdef, params)(inputs_bl).astype(jnp.float32)
    logp_blv = jax.nn.log_softmax(logits_blv, axis=-1)
    target_logp_bl = jnp.take_along_axis(logp_blv, targets_bl[..., None], axis=-1)[..., 0]
    hit_bl = jnp.argmax(logits_blv, axis=-1) == targets_bl
    return (jnp.sum(jnp.where(scored_bl, target_logp_bl, 0.0), axis=-1),
            jnp.all(hit_bl | ~scored_bl, axis=-1))

  return jax.jit(score)


class Scorer:
  """Scores requests in batches of similar length (longest first), each padded on the right
  to a multiple of LENGTH_STEP; max_len: the most tokens the model reads at once."""

  def __init__(self, graphdef, params, *, batch_size: int, max_len: int):
    self.graphdef, self.params = graphdef, params
    self.batch_size, self.max_len = batch_size, max_len

  def _arrays(self, requests: list[Request]):
    length = min(self.max_len, -(-max(len(r.tokens) - 1 for r in requests) // LENGTH_STEP)
                 * LENGTH_STEP)
    inputs, targets, scored = (np.zeros((self.batch_size, length), dtype) for dtype in
                               (np.int32, np.int32, bool))
    for row, request in enumerate(requests):
      tokens = request.tokens[-(self.max_len + 1):]
      n = len(tokens) - 1
      inputs[row, :n], targets[row, :n] = tokens[:-1], tokens[1:]
      scored[row, max(0, n - request.n_scored):n] = True
    return inputs, targets, scored

  def __call__(self, requests: list[Request]) -> list[Score]:
    order = sorted(range(len(requests)), key=lambda i: -len(requests[i].tokens))
    score = _score_batch(self.graphdef)
    results = [None] * len(requests)
    for start in range(0, len(order), self.batch_size):
      chunk = order[start:start + self.batch_size]
      logprob_b, greedy_b = jax.device_get(
          score(self.params, *self._arrays([requests[i] for i in chunk])))
      for row, i in enumerate(chunk):
        results[i] = Score(float(logprob_b[row]), bool(greedy_b[row]))
    return results


def check_decoder(config, what: str):
  if config.family != 'decoder' or config.n_labels:
    raise ConfigError(f'{what} scores text with a language-model decoder; this model is a '
                      f'{config.family}' + (' classifier' if config.n_labels else ''))
