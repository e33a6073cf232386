"""Policy-gradient losses on the policy's samples: GRPO's (Shao et al. 2024, DeepSeekMath),
with Dr. GRPO's unbiased variant (Liu et al. 2025), and PPO's (Schulman et al. 2017) as
InstructGPT and TRL run it.

G completions of one prompt form a group; completion i's reward r_i becomes its advantage
  grpo     A_i = (r_i - mean(r)) / (std(r) + 1e-4)   (std with Bessel's correction, as TRL's)
  dr_grpo  A_i = r_i - mean(r)
given to each of its tokens t, whose loss is the clipped surrogate with a KL penalty to the
reference model (the k3 estimator, unbiased and positive):
  ρ_t = π(o_t) / π_old(o_t),   k3_t = π_ref(o_t)/π(o_t) - log(π_ref(o_t)/π(o_t)) - 1,
  ℓ_t = -(min(ρ_t A_i, clip(ρ_t, 1-ε, 1+ε) A_i) - β k3_t).
grpo averages ℓ over each completion's tokens, then over completions (longer wrong answers
are penalised less per token: the length bias Dr. GRPO removes); dr_grpo sums ℓ over every
token and divides by a constant, completions times the most tokens a completion may have.

PPO gives each completion token t the reward -β (log π_old(o_t) - log π_ref(o_t)), plus the
completion's score at its last token; generalised advantage estimation (Schulman et al. 2016)
with the value head's V_t: δ_t = r_t + γ V_{t+1} - V_t, A_t = δ_t + γλ A_{t+1} (V and A are 0
after the last token); returns R_t = A_t + V_t. The advantages are whitened over the batch's
completion tokens; the loss is the mean over them of the clipped surrogate plus value_coef times
½ max((V - R)², (V_old + clip(V - V_old, ±value_clip) - R)²).
"""
import jax
import jax.numpy as jnp

GRPO_LOSSES = ('grpo', 'dr_grpo')


def group_advantages(rewards_b, group_size: int, kind: str):
  """A_i of rows that come in groups of group_size consecutive completions of one prompt."""
  groups_gx = rewards_b.reshape(-1, group_size)
  centred_gx = groups_gx - groups_gx.mean(axis=1, keepdims=True)
  if kind == 'grpo':
    centred_gx = centred_gx / (jnp.std(groups_gx, axis=1, ddof=1, keepdims=True) + 1e-4)
  return centred_gx.reshape(-1)


def grpo_loss(kind: str, *, logps_bt, old_logps_bt, ref_logps_bt, advantages_b, mask_bt,
              beta: float, epsilon: float, max_tokens: int):
  """(loss, per-token k3 [B, T], whether each token's ratio was clipped [B, T]); mask_bt is 1
  on the completions' tokens. ref_logps_bt None: no KL penalty."""
  ratio_bt = jnp.exp(logps_bt - old_logps_bt)
  advantages_b1 = advantages_b[:, None]
  surrogate_bt = jnp.minimum(ratio_bt * advantages_b1,
                             jnp.clip(ratio_bt, 1 - epsilon, 1 + epsilon) * advantages_b1)
  k3_bt = jnp.zeros_like(logps_bt)
  if ref_logps_bt is not None:
    log_ratio_bt = ref_logps_bt - logps_bt
    k3_bt = jnp.exp(log_ratio_bt) - log_ratio_bt - 1
  per_token_bt = -(surrogate_bt - beta * k3_bt) * mask_bt
  if kind == 'grpo':
    loss = jnp.mean(jnp.sum(per_token_bt, axis=1) / jnp.maximum(jnp.sum(mask_bt, axis=1), 1))
  else:
    loss = jnp.sum(per_token_bt) / (mask_bt.shape[0] * max_tokens)
  clipped_bt = (ratio_bt - 1) * jnp.sign(advantages_b1) > epsilon
  return loss, k3_bt, clipped_bt


def whiten(x_bt, mask_bt, shift_mean: bool = True):
  """x scaled to unit variance (Bessel-corrected, as TRL's) and, with shift_mean, mean 0, over
  the positions of mask_bt."""
  count = jnp.sum(mask_bt)
  mean = jnp.sum(x_bt * mask_bt) / jnp.maximum(count, 1)
  variance = jnp.sum(jnp.square(x_bt - mean) * mask_bt) / jnp.maximum(count - 1, 1)
  whitened_bt = (x_bt - mean) * jax.lax.rsqrt(variance + 1e-8)
  return whitened_bt if shift_mean else whitened_bt + mean


def gae(rewards_bt, values_bt, mask_bt, *, gamma: float, lam: float):
  """(advantages, returns) [B, T] of GAE over the positions of mask_bt, a contiguous run per
  row; values beyond it count as 0 (the episode has ended)."""
  next_values_bt = jnp.concatenate([values_bt[:, 1:] * mask_bt[:, 1:],
                                    jnp.zeros_like(values_bt[:, :1])], axis=1)
  deltas_bt = (rewards_bt + gamma * next_values_bt - values_bt) * mask_bt

  def back(later_b, step):
    delta_b, mask_b = step
    advantage_b = (delta_b + gamma * lam * later_b) * mask_b
    return advantage_b, advantage_b

  _, advantages_tb = jax.lax.scan(back, jnp.zeros_like(rewards_bt[:, 0]),
                                  (deltas_bt.T, mask_bt.T), reverse=True)
  advantages_bt = advantages_tb.T
  return advantages_bt, (advantages_bt + values_bt) * mask_bt


def ppo_loss(*, logps_bt, old_logps_bt, advantages_bt, values_bt, old_values_bt, returns_bt,
             mask_bt, epsilon: float, value_clip: float, value_coef: float):
  """(loss, policy loss, value loss, whether each token's ratio was clipped [B, T])."""
  count = jnp.maximum(jnp.sum(mask_bt), 1)
  ratio_bt = jnp.exp(logps_bt - old_logps_bt)
  policy_bt = jnp.maximum(-advantages_bt * ratio_bt,
                          -advantages_bt * jnp.clip(ratio_bt, 1 - epsilon, 1 + epsilon))
  policy_loss = jnp.sum(policy_bt * mask_bt) / count
  clipped_values_bt = old_values_bt + jnp.clip(values_bt - old_values_bt, -value_clip,
                                               value_clip)
  value_bt = 0.5 * jnp.maximum(jnp.square(values_bt - returns_bt),
                               jnp.square(clipped_values_bt - returns_bt))
  value_loss = jnp.sum(value_bt * mask_bt) / count
  clipped_bt = (ratio_bt - 1) * jnp.sign(advantages_bt) > epsilon
  return policy_loss + value_coef * value_loss, policy_loss, value_loss, clipped_bt
