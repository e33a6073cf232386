"""Autoregressive generation with a KV cache, jitted as one loop.

The prompt is run once (prefill); then a `lax.while_loop` decodes one token per
iteration against the cache until max_new_tokens or until every row has produced the
end-of-text token. Sampling: greedy (temperature 0), temperature, top-k, top-p and a
repetition penalty (Keskar et al. 2019: positive logits of seen tokens divided by it,
negative ones multiplied).
"""
import dataclasses

import jax
import jax.numpy as jnp
from flax import nnx

from lmlab.models import shared_prefix
from lmlab.models.errors import ConfigError


@dataclasses.dataclass(frozen=True)
class SamplingConfig:
  """How tokens are drawn; each field's comment is its --flag's help text."""
  max_new_tokens: int = 200  # Tokens to generate.
  temperature: float = 0.8  # Sampling temperature; 0 is greedy.
  top_k: int = 0  # Sample among the k likeliest tokens; 0: all.
  top_p: float = 1.0  # Nucleus sampling mass; 1: off.
  repetition_penalty: float = 1.0  # Penalty for tokens already present; 1: off.


def next_token_logits(logits_bv, seen_bv, config: SamplingConfig):
  """Logits after repetition penalty, temperature, top-k and top-p (masked to -inf)."""
  logits_bv = logits_bv.astype(jnp.float32)
  if config.repetition_penalty != 1.0:
    penalised = jnp.where(logits_bv > 0, logits_bv / config.repetition_penalty,
                          logits_bv * config.repetition_penalty)
    logits_bv = jnp.where(seen_bv, penalised, logits_bv)
  if config.temperature == 0.0:
    return logits_bv
  logits_bv = logits_bv / config.temperature
  if config.top_k:
    kth_best = jax.lax.top_k(logits_bv, config.top_k)[0][:, -1:]
    logits_bv = jnp.where(logits_bv < kth_best, -jnp.inf, logits_bv)
  if config.top_p < 1.0:
    sorted_desc = -jnp.sort(-logits_bv, axis=-1)
    probs = jax.nn.softmax(sorted_desc, axis=-1)
    mass_before = jnp.cumsum(probs, axis=-1) - probs
    # The smallest set whose mass reaches top_p: keep tokens whose preceding mass is below it.
    kept = jnp.where(mass_before < config.top_p, sorted_desc, jnp.inf)
    threshold = jnp.min(kept, axis=-1, keepdims=True)
    logits_bv = jnp.where(logits_bv < threshold, -jnp.inf, logits_bv)
  return logits_bv


def choose(logits_bv, seen_bv, key, config: SamplingConfig, n_valid: int):
  """The next token; ids >= n_valid (padding of the embedding table) are never chosen."""
  logits_bv = jnp.where(jnp.arange(logits_bv.shape[-1]) < n_valid, logits_bv, -jnp.inf)
  logits_bv = next_token_logits(logits_bv, seen_bv, config)
  if config.temperature == 0.0:
    return jnp.argmax(logits_bv, axis=-1).astype(jnp.int32)
  return jax.random.categorical(key, logits_bv, axis=-1).astype(jnp.int32)


def make_generate(graphdef, config: SamplingConfig, *, end_token: int, n_valid: int,
                  num_samples: int = 1):
  """generate(params, prompt_bt, key) -> new tokens [B, max_new_tokens].

  Tokens are drawn from ids below n_valid, the tokenizer's vocabulary size.
  After a row's end-of-text token its remaining slots hold end_token too.
  With num_samples > 1, prompt_bt is one prompt [1, T] and the result holds num_samples
  continuations of it [num_samples, max_new_tokens], which read one copy of the prompt's
  KV cache (models/shared_prefix.py).
  """
  if num_samples < 1:
    raise ConfigError(f'--num_samples must be at least 1, got {num_samples}')

  @jax.jit
  def generate(params, prompt_bt, key):
    model = nnx.merge(graphdef, params)
    t = prompt_bt.shape[1]
    n_new = config.max_new_tokens
    if num_samples == 1:
      caches = model.init_cache(prompt_bt.shape[0], t + n_new)
      logits_btv, caches = model.decode(prompt_bt, caches, 0)
    else:
      shared_prefix.check_supported(model.config)
      if prompt_bt.shape[0] != 1:
        raise ValueError(f'num_samples={num_samples} continues one prompt, not '
                         f'{prompt_bt.shape[0]}')
      logits_btv, caches = model.decode(prompt_bt, model.init_cache(1, t), 0)
      caches = shared_prefix.share(caches, num_samples, n_new)
      logits_btv = jnp.repeat(logits_btv[:, -1:], num_samples, axis=0)
      prompt_bt = jnp.repeat(prompt_bt, num_samples, axis=0)
    b = prompt_bt.shape[0]
    vocab = model.config.vocab_size
    seen_bv = jnp.zeros((b, vocab), bool).at[jnp.arange(b)[:, None], prompt_bt].set(True)

    key, sub = jax.random.split(key)
    token_b = choose(logits_btv[:, -1], seen_bv, sub, config, n_valid)
    out_bl = jnp.full((b, n_new), end_token, jnp.int32).at[:, 0].set(token_b)
    done_b = token_b == end_token

    def keep_going(carry):
      i, _, _, _, _, done_b, _ = carry
      return (i < n_new) & ~jnp.all(done_b)

    def step(carry):
      i, token_b, caches, out_bl, seen_bv, done_b, key = carry
      seen_bv = seen_bv.at[jnp.arange(b), token_b].set(True)
      logits_btv, caches = model.decode(token_b[:, None], caches, t + i - 1)
      key, sub = jax.random.split(key)
      chosen_b = choose(logits_btv[:, 0], seen_bv, sub, config, n_valid)
      token_b = jnp.where(done_b, end_token, chosen_b)
      out_bl = out_bl.at[:, i].set(token_b)
      done_b = done_b | (token_b == end_token)
      return i + 1, token_b, caches, out_bl, seen_bv, done_b, key

    carry = (jnp.int32(1), token_b, caches, out_bl, seen_bv, done_b, key)
    return jax.lax.while_loop(keep_going, step, carry)[3]

  return generate
