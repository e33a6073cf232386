"""GRPO's advantages and loss (Shao et al. 2024, DeepSeekMath), with Dr. GRPO's unbiased
variant (Liu et al. 2025).

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
"""
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
