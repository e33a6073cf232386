"""The pairwise losses of preference learning, per pair [B].

A reward model's loss on its scores r_c, r_r of the chosen and rejected replies:
  -log σ(r_c - r_r - m)                  InstructGPT (Ouyang et al. 2022); margin m: Llama 2

Direct preference losses (DPO_LOSSES) on the policy's log-probabilities of the replies,
log π(c) and log π(r) (summed over each reply's tokens), and the frozen reference's:
with h_c = log π(c) - log π_ref(c), h_r likewise, and Δ = h_c - h_r,
  sigmoid  -(1-ε) log σ(βΔ) - ε log σ(-βΔ)          DPO (Rafailov et al. 2023); ε > 0: cDPO,
                                                    labels flipped with probability ε
  robust   (-(1-ε) log σ(βΔ) + ε log σ(-βΔ))/(1-2ε) rDPO (Chowdhury et al. 2024): unbiased
                                                    under flips with probability ε < 1/2
  hinge    max(0, 1 - βΔ)                           SLiC-HF (Zhao et al. 2023)
  ipo      (h_c/|c| - h_r/|r| - 1/(2β))^2           IPO (Azar et al. 2023), its log-ratios
                                                    per token as TRL's (which the authors
                                                    confirmed is what the paper ran)
  simpo    the sigmoid loss of β(log π(c)/|c| - log π(r)/|r|) - γ, no reference
                                                    (SimPO, Meng et al. 2024)
|c| and |r| are the replies' lengths in tokens. The implicit rewards reported beside a
loss are β h (SimPO: β times the mean log-probability per token).

RPO (Pang et al. 2024) adds α times the chosen replies' negative log-likelihood, a mean over
every chosen token of the batch (not per pair), to a DPO loss: chosen_nll.
"""
import jax
import jax.numpy as jnp

DPO_LOSSES = ('sigmoid', 'robust', 'hinge', 'ipo', 'simpo')
# The losses that read label_smoothing (ε).
SMOOTHED = ('sigmoid', 'robust', 'simpo')


def reward_loss(chosen_b, rejected_b, margin_b):
  return -jax.nn.log_sigmoid(chosen_b - rejected_b - margin_b)


def chosen_nll(chosen_logps_b, chosen_length_b, weight_b):
  """-Σ log π(c) / Σ |c| over the pairs of weight 1 (a scalar)."""
  return -jnp.sum(chosen_logps_b * weight_b) / jnp.maximum(
      jnp.sum(chosen_length_b * weight_b), 1.0)


def _smoothed_sigmoid(logits_b, smoothing: float):
  return (-(1 - smoothing) * jax.nn.log_sigmoid(logits_b)
          - smoothing * jax.nn.log_sigmoid(-logits_b))


def dpo_loss(kind: str, *, beta: float, chosen_logps_b, rejected_logps_b, ref_chosen_logps_b,
             ref_rejected_logps_b, chosen_length_b, rejected_length_b,
             label_smoothing: float = 0.0, gamma: float = 0.0):
  """(loss [B], chosen rewards [B], rejected rewards [B]) of the DPO_LOSSES `kind`; simpo
  reads no reference (pass None) and gamma (γ)."""
  if kind == 'simpo':
    chosen_b = chosen_logps_b / chosen_length_b
    rejected_b = rejected_logps_b / rejected_length_b
    loss_b = _smoothed_sigmoid(beta * (chosen_b - rejected_b) - gamma, label_smoothing)
    return loss_b, beta * chosen_b, beta * rejected_b
  chosen_ratio_b = chosen_logps_b - ref_chosen_logps_b
  rejected_ratio_b = rejected_logps_b - ref_rejected_logps_b
  delta_b = chosen_ratio_b - rejected_ratio_b
  if kind == 'sigmoid':
    loss_b = _smoothed_sigmoid(beta * delta_b, label_smoothing)
  elif kind == 'robust':
    loss_b = ((-(1 - label_smoothing) * jax.nn.log_sigmoid(beta * delta_b)
               + label_smoothing * jax.nn.log_sigmoid(-beta * delta_b))
              / (1 - 2 * label_smoothing))
  elif kind == 'hinge':
    loss_b = jax.nn.relu(1 - beta * delta_b)
  elif kind == 'ipo':
    per_token_b = chosen_ratio_b / chosen_length_b - rejected_ratio_b / rejected_length_b
    loss_b = jnp.square(per_token_b - 1 / (2 * beta))
  else:
    raise ValueError(f'unknown DPO loss {kind!r}; one of {", ".join(DPO_LOSSES)}')
  return loss_b, beta * chosen_ratio_b, beta * rejected_ratio_b
