"""Speculative decoding (Leviathan et al. 2023; Chen et al. 2023): a small draft model proposes
`gamma` tokens one at a time, the target scores all of them in one forward pass, and each is
kept with probability min(1, p(x) / q(x)) (p the target's distribution, q the draft's); at the
first rejection a token is drawn from max(0, p - q) renormalised, and when all are kept, one
more from the target's next distribution. Every round thus adds 1..gamma+1 tokens, and the
tokens are distributed exactly as the target's own sampling would draw them (greedy decoding:
the target's argmax path), whatever the draft.

p and q are the sampling distributions after temperature, top-k and top-p (one-hot at the
argmax when greedy). A repetition penalty would make them depend on the tokens drafted in the
same round, and is refused. One prompt at a time: rows would accept different numbers of
tokens, and the caches advance by one position for all rows.

Both caches hold keys of every committed token but the last, which each round feeds first;
a rejected token's slot is simply written again by the next round (the causal mask hides the
slots beyond the query's position). The draft's loop runs gamma+1 steps so that its cache also
holds the last drafted token when every one is kept.
"""
import jax
import jax.numpy as jnp
from flax import nnx

from lmlab.models.errors import ConfigError
from lmlab.models.generation import SamplingConfig, next_token_logits


def sampling_probs(logits_bv, config: SamplingConfig, n_valid: int):
  """The distribution a token is drawn from: ids >= n_valid never; one-hot when greedy."""
  logits_bv = jnp.where(jnp.arange(logits_bv.shape[-1]) < n_valid, logits_bv, -jnp.inf)
  logits_bv = next_token_logits(logits_bv, None, config)
  if config.temperature == 0.0:
    return jax.nn.one_hot(jnp.argmax(logits_bv, axis=-1), logits_bv.shape[-1])
  return jax.nn.softmax(logits_bv, axis=-1)


def _draw(key, probs_v):
  return jax.random.categorical(key, jnp.log(probs_v)).astype(jnp.int32)


def make_speculative_generate(target_graphdef, draft_graphdef, config: SamplingConfig, *,
                              gamma: int, end_token: int, n_valid: int):
  """generate(target_params, draft_params, prompt_1t, key) -> (new tokens [1, max_new_tokens],
  rounds, drafted tokens accepted). After the end-of-text token, slots hold end_token."""
  if config.repetition_penalty != 1.0:
    raise ConfigError(f'--repetition_penalty={config.repetition_penalty} makes each drafted '
                      'token\'s distribution depend on the ones before it in its round; '
                      'speculative decoding (--draft) needs --repetition_penalty=1')
  if gamma < 1:
    raise ConfigError(f'--draft_tokens={gamma}: the draft must propose at least one '
                      'token')
  n_new = config.max_new_tokens

  @jax.jit
  def generate(target_params, draft_params, prompt_1t, key):
    target, draft = nnx.merge(target_graphdef, target_params), nnx.merge(draft_graphdef,
                                                                        draft_params)
    if prompt_1t.shape[0] != 1:
      raise ConfigError('speculative decoding takes one prompt at a time')
    t = prompt_1t.shape[1]
    length = t + n_new + gamma + 1
    target_caches, draft_caches = target.init_cache(1, length), draft.init_cache(1, length)
    if t > 1:
      _, target_caches = target.decode(prompt_1t[:, :-1], target_caches, 0)
      _, draft_caches = draft.decode(prompt_1t[:, :-1], draft_caches, 0)

    def draft_step(carry, _):
      token, position, caches, key = carry
      logits_1tv, caches = draft.decode(token.reshape(1, 1), caches, position)
      q_v = sampling_probs(logits_1tv[:, 0], config, n_valid)[0]
      key, sub = jax.random.split(key)
      drafted = _draw(sub, q_v)
      return (drafted, position + 1, caches, key), (drafted, q_v)

    def keep_going(carry):
      written, done = carry[4], carry[5]
      return (written < n_new) & ~done

    def round_(carry):
      last, position, target_caches, draft_caches, written, done, out_l, key, stats = carry
      (_, _, draft_caches, key), (drafted_g, q_gv) = jax.lax.scan(
          draft_step, (last, position, draft_caches, key), None, length=gamma + 1)
      drafted_g, q_gv = drafted_g[:gamma], q_gv[:gamma]
      fed_1g = jnp.concatenate([last[None], drafted_g])[None]
      logits_1gv, target_caches = target.decode(fed_1g, target_caches, position)
      p_gv = sampling_probs(logits_1gv[0], config, n_valid)  # gamma+1 distributions
      key, accept_key, residual_key = jax.random.split(key, 3)
      p_drafted = jnp.take_along_axis(p_gv[:gamma], drafted_g[:, None], axis=1)[:, 0]
      q_drafted = jnp.take_along_axis(q_gv, drafted_g[:, None], axis=1)[:, 0]
      kept_g = jax.random.uniform(accept_key, (gamma,)) * q_drafted < p_drafted
      n_kept = jnp.sum(jnp.cumprod(kept_g))
      # After the last draft q is 0: the residual there is the target's own distribution.
      q_padded = jnp.concatenate([q_gv, jnp.zeros_like(q_gv[:1])])
      residual_v = jnp.maximum(p_gv[n_kept] - q_padded[n_kept], 0.0)
      residual_v = jnp.where(jnp.sum(residual_v) > 0, residual_v, p_gv[n_kept])
      extra = _draw(residual_key, residual_v)
      new_g = jnp.where(jnp.arange(gamma + 1) < n_kept,
                        jnp.concatenate([drafted_g, drafted_g[:1]]), extra)
      out_l = jax.lax.dynamic_update_slice(out_l, new_g, (written,))
      done = done | jnp.any((new_g == end_token) & (jnp.arange(gamma + 1) <= n_kept))
      stats = stats + jnp.stack([1, n_kept])
      return (extra, position + n_kept + 1, target_caches, draft_caches, written + n_kept + 1,
              done, out_l, key, stats)

    out_l = jnp.full((n_new + gamma + 1,), end_token, jnp.int32)
    carry = (prompt_1t[0, -1], jnp.int32(t - 1), target_caches, draft_caches, jnp.int32(0),
             jnp.bool_(False), out_l, key, jnp.zeros(2, jnp.int32))
    carry = jax.lax.while_loop(keep_going, round_, carry)
    out_l, stats = carry[6][:n_new], carry[8]
    ended = jnp.cumsum(out_l == end_token) > 0
    out_l = jnp.where(ended, end_token, out_l)
    return out_l[None], stats[0], stats[1]

  return generate
