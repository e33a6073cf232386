"""GRPO's advantages and loss against the formulas of DeepSeekMath and Dr. GRPO written in
numpy, and against TRL's GRPOTrainer (loss, KL and clip metrics) where TRL is installed; PPO's
GAE, whitening and loss against theirs (Schulman et al. 2016, 2017) in numpy."""
import collections
import types

import jax.numpy as jnp
import numpy as np
import pytest

from lmlab.training.policy_losses import (GRPO_LOSSES, gae, group_advantages, grpo_loss,
                                           ppo_loss, whiten)


def random_rollout(rng, b=12, t=9):
  logps = -rng.uniform(0.01, 4.0, (b, t))
  old = logps + rng.normal(0.0, 0.3, (b, t))  # Ratios on both sides of the clip range.
  ref = logps + rng.normal(0.0, 0.5, (b, t))
  mask = (np.arange(t) < rng.integers(1, t + 1, b)[:, None]).astype(np.float64)
  return logps, old, ref, rng.normal(0.0, 1.0, b), mask


def paper_loss(kind, logps, old, ref, advantages, mask, beta, epsilon, max_tokens):
  """DeepSeekMath eq. 3 (and 4 for the KL), token by token; Dr. GRPO's constant normaliser."""
  b, t = logps.shape
  per_token = np.zeros((b, t))
  for i in range(b):
    for j in range(t):
      ratio = np.exp(logps[i, j] - old[i, j])
      clipped = min(max(ratio, 1 - epsilon), 1 + epsilon)
      kl = np.exp(ref[i, j] - logps[i, j]) - (ref[i, j] - logps[i, j]) - 1
      per_token[i, j] = -(min(ratio * advantages[i], clipped * advantages[i]) - beta * kl)
  if kind == 'grpo':
    return np.mean([per_token[i][mask[i] == 1].mean() for i in range(b)])
  return (per_token * mask).sum() / (b * max_tokens)


@pytest.mark.parametrize('kind', GRPO_LOSSES)
def test_grpo_loss_is_the_papers_formula(kind, rng):
  beta, epsilon = rng.uniform(0.0, 0.2), rng.uniform(0.05, 0.4)
  logps, old, ref, advantages, mask = random_rollout(rng)
  loss, k3, clipped = grpo_loss(kind, logps_bt=jnp.asarray(logps), old_logps_bt=jnp.asarray(old),
                                ref_logps_bt=jnp.asarray(ref), advantages_b=jnp.asarray(advantages),
                                mask_bt=jnp.asarray(mask), beta=beta, epsilon=epsilon,
                                max_tokens=16)
  np.testing.assert_allclose(loss, paper_loss(kind, logps, old, ref, advantages, mask, beta,
                                              epsilon, 16), rtol=1e-5)
  ratio = np.exp(logps - old)
  expected = ((ratio > 1 + epsilon) & (advantages[:, None] > 0)) | (
      (ratio < 1 - epsilon) & (advantages[:, None] < 0))
  np.testing.assert_array_equal(np.asarray(clipped), expected)


@pytest.mark.parametrize('kind', GRPO_LOSSES)
def test_group_advantages(kind, rng):
  g = int(rng.integers(2, 6))
  rewards = rng.integers(0, 3, 4 * g).astype(np.float32)
  groups = rewards.reshape(4, g)
  expected = groups - groups.mean(axis=1, keepdims=True)
  if kind == 'grpo':
    expected = expected / (groups.std(axis=1, ddof=1, keepdims=True) + 1e-4)
  np.testing.assert_allclose(group_advantages(jnp.asarray(rewards), g, kind),
                             expected.reshape(-1), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize('kind', GRPO_LOSSES)
def test_grpo_loss_and_metrics_match_trl(kind, rng):
  torch = pytest.importorskip('torch')
  grpo_trainer = pytest.importorskip('trl.trainer.grpo_trainer')
  trl_utils = pytest.importorskip('trl.trainer.utils')
  beta, epsilon, max_tokens = rng.uniform(0.01, 0.2), rng.uniform(0.05, 0.4), 16
  logps, old, ref, advantages, mask = random_rollout(rng)
  b, t = logps.shape
  identity = lambda x: x
  trainer = types.SimpleNamespace(
      _get_per_token_logps_and_entropies=lambda *a, **k: (torch.tensor(logps),
                                                          torch.zeros(b, t), None),
      top_entropy_quantile=1.0, off_policy_mask_threshold=None, importance_sampling_level='token',
      beta=beta, loss_type=kind, epsilon_low=epsilon, epsilon_high=epsilon,
      args=types.SimpleNamespace(delta=None, use_bias_correction_kl=False), use_vllm=False,
      model=types.SimpleNamespace(training=True), current_gradient_accumulation_steps=1,
      max_completion_length=max_tokens, _entropy_bonus_enabled=False, aux_loss_enabled=False,
      _metrics=collections.defaultdict(lambda: collections.defaultdict(list)),
      accelerator=types.SimpleNamespace(reduce=lambda x, reduction: x, gather=identity))
  inputs = {'prompt_ids': torch.zeros(b, 1, dtype=torch.long),
            'prompt_mask': torch.ones(b, 1, dtype=torch.long),
            'completion_ids': torch.zeros(b, t, dtype=torch.long),
            'completion_mask': torch.tensor(mask), 'advantages': torch.tensor(advantages),
            'old_per_token_logps': torch.tensor(old), 'ref_per_token_logps': torch.tensor(ref)}
  expected = float(grpo_trainer.GRPOTrainer._compute_loss(trainer, None, inputs))
  metrics = trainer._metrics['train']
  loss, k3, clipped = grpo_loss(kind, logps_bt=jnp.asarray(logps), old_logps_bt=jnp.asarray(old),
                                ref_logps_bt=jnp.asarray(ref), advantages_b=jnp.asarray(advantages),
                                mask_bt=jnp.asarray(mask), beta=beta, epsilon=epsilon,
                                max_tokens=max_tokens)
  # The loss is a float32 sum of about 100 terms of either sign: where it cancels to near zero
  # it keeps the terms' absolute rounding error, not a small relative one (seed 3482250416).
  np.testing.assert_allclose(loss, expected, rtol=1e-5, atol=1e-6)
  masked_mean = lambda x: float(np.sum(np.asarray(x) * mask) / mask.sum())
  np.testing.assert_allclose(masked_mean(k3), metrics['kl'][0], rtol=1e-5)
  np.testing.assert_allclose(masked_mean(clipped), metrics['clip_ratio/region_mean'][0],
                             rtol=1e-6)
  rewards = torch.tensor(rng.integers(0, 2, 8).astype(np.float64))
  np.testing.assert_allclose(
      group_advantages(jnp.asarray(rewards.numpy()), 8, 'grpo'),
      ((rewards - rewards.mean()) / (trl_utils.nanstd(rewards) + 1e-4)).numpy(), rtol=1e-5,
      atol=1e-6)


def test_gae_is_the_discounted_sum_of_td_errors(rng):
  """A_t = sum_l (γλ)^l δ_{t+l} over the completion (Schulman et al. 2016, eq. 16), which
  starts after a prompt and ends before padding; R_t = A_t + V_t."""
  b, t = 5, 10
  gamma, lam = rng.uniform(0.8, 1.0), rng.uniform(0.5, 1.0)
  rewards, values = rng.normal(size=(2, b, t))
  start = rng.integers(0, 4, b)
  end = start + rng.integers(1, t - 3, b)
  mask = ((np.arange(t) >= start[:, None]) & (np.arange(t) < end[:, None])).astype(np.float64)
  expected = np.zeros((b, t))
  for i in range(b):
    v = lambda j: values[i, j] if j < end[i] else 0.0
    deltas = [rewards[i, j] + gamma * v(j + 1) - values[i, j] for j in range(t)]
    for j in range(start[i], end[i]):
      expected[i, j] = sum((gamma * lam) ** (k - j) * deltas[k] for k in range(j, end[i]))
  advantages, returns = gae(jnp.asarray(rewards * mask), jnp.asarray(values * mask),
                            jnp.asarray(mask), gamma=gamma, lam=lam)
  np.testing.assert_allclose(advantages, expected, rtol=1e-4, atol=1e-5)
  np.testing.assert_allclose(returns, (expected + values) * mask, rtol=1e-4, atol=1e-5)


def test_whiten_and_ppo_loss_are_their_formulas(rng):
  logps, old, _, _, mask = random_rollout(rng)
  advantages, values, old_values, returns = rng.normal(size=(4, *logps.shape))
  real = mask == 1
  x = advantages[real]
  np.testing.assert_allclose(np.asarray(whiten(jnp.asarray(advantages), jnp.asarray(mask)))[real],
                             (x - x.mean()) / x.std(ddof=1), rtol=1e-4, atol=1e-5)
  epsilon, value_clip, value_coef = rng.uniform(0.05, 0.4), rng.uniform(0.05, 0.5), 0.1
  loss, policy, value, _ = ppo_loss(
      logps_bt=jnp.asarray(logps), old_logps_bt=jnp.asarray(old),
      advantages_bt=jnp.asarray(advantages), values_bt=jnp.asarray(values),
      old_values_bt=jnp.asarray(old_values), returns_bt=jnp.asarray(returns),
      mask_bt=jnp.asarray(mask), epsilon=epsilon, value_clip=value_clip, value_coef=value_coef)
  ratio = np.exp(logps - old)[real]
  a = advantages[real]
  surrogate = np.minimum(ratio * a, np.clip(ratio, 1 - epsilon, 1 + epsilon) * a)
  v, v_old, r = values[real], old_values[real], returns[real]
  v_clipped = v_old + np.clip(v - v_old, -value_clip, value_clip)
  value_expected = np.mean(0.5 * np.maximum((v - r) ** 2, (v_clipped - r) ** 2))
  np.testing.assert_allclose(policy, -surrogate.mean(), rtol=1e-4)
  np.testing.assert_allclose(value, value_expected, rtol=1e-4)
  np.testing.assert_allclose(loss, -surrogate.mean() + value_coef * value_expected, rtol=1e-4)
