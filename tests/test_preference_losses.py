"""Each preference loss against its paper's formula written in numpy, and against TRL's
implementation (DPOTrainer's loss and metrics; CPOTrainer's SimPO) where TRL is installed."""
import collections
import types

import numpy as np
import pytest

from lmlab.training.preference_losses import DPO_LOSSES, chosen_nll, dpo_loss, reward_loss


def log_sigmoid(x):
  return -np.logaddexp(0.0, -x)


def paper_loss(kind, beta, smoothing, gamma, pc, pr, rc, rr, nc, nr):
  """The per-pair loss of each paper, on policy (p) and reference (r) log-probabilities of the
  chosen (c) and rejected (r) replies of n_ tokens."""
  if kind == 'simpo':  # Meng et al. 2024, eq. 6, with cDPO's smoothing.
    z = beta * pc / nc - beta * pr / nr - gamma
    return -(1 - smoothing) * log_sigmoid(z) - smoothing * log_sigmoid(-z)
  z = beta * ((pc - rc) - (pr - rr))
  if kind == 'sigmoid':  # Rafailov et al. 2023, eq. 7; Mitchell's cDPO note.
    return -(1 - smoothing) * log_sigmoid(z) - smoothing * log_sigmoid(-z)
  if kind == 'robust':  # Chowdhury et al. 2024, eq. 8.
    return ((1 - smoothing) * -log_sigmoid(z) - smoothing * -log_sigmoid(-z)) / (1 - 2 * smoothing)
  if kind == 'hinge':  # Zhao et al. 2023 (SLiC), with delta 1.
    return np.maximum(0.0, 1.0 - z)
  # Azar et al. 2023, eq. 17, its log-ratios per token.
  h = (pc - rc) / nc - (pr - rr) / nr
  return (h - 1 / (2 * beta)) ** 2


def random_pairs(rng, b=16):
  pc, pr, rc, rr = -rng.uniform(0.5, 30.0, (4, b)).astype(np.float32)
  nc, nr = rng.integers(1, 20, (2, b)).astype(np.float32)
  return pc, pr, rc, rr, nc, nr


def ours(kind, beta, smoothing, gamma, pc, pr, rc, rr, nc, nr):
  loss, chosen, rejected = dpo_loss(
      kind, beta=beta, chosen_logps_b=pc, rejected_logps_b=pr,
      ref_chosen_logps_b=None if kind == 'simpo' else rc,
      ref_rejected_logps_b=None if kind == 'simpo' else rr, chosen_length_b=nc,
      rejected_length_b=nr, label_smoothing=smoothing, gamma=gamma)
  return np.asarray(loss), np.asarray(chosen), np.asarray(rejected)


@pytest.mark.parametrize('kind', DPO_LOSSES)
def test_dpo_losses_are_their_papers_formulas(kind, rng):
  beta, gamma = rng.uniform(0.05, 2.0), rng.uniform(0.0, 1.0)
  smoothing = rng.uniform(0.0, 0.4) if kind in ('sigmoid', 'robust', 'simpo') else 0.0
  pairs = random_pairs(rng)
  loss, chosen, rejected = ours(kind, beta, smoothing, gamma, *pairs)
  np.testing.assert_allclose(loss, paper_loss(kind, beta, smoothing, gamma, *pairs), rtol=2e-5,
                             atol=1e-6)
  pc, pr, rc, rr, nc, nr = pairs
  expected = ((beta * pc / nc, beta * pr / nr) if kind == 'simpo'
              else (beta * (pc - rc), beta * (pr - rr)))
  np.testing.assert_allclose(chosen, expected[0], rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(rejected, expected[1], rtol=1e-5, atol=1e-6)


def test_dpo_at_the_reference_is_log_two_and_robust_is_unbiased(rng):
  """Policy = reference: every pair's DPO loss is log 2. rDPO's loss averaged over a label
  flip with probability ε is the clean DPO loss (its defining property)."""
  pc, pr, _, _, nc, nr = random_pairs(rng)
  loss, _, _ = ours('sigmoid', 0.1, 0.0, 0.0, pc, pr, pc, pr, nc, nr)
  np.testing.assert_allclose(loss, np.log(2.0), rtol=1e-6)
  beta, eps = rng.uniform(0.05, 1.0), rng.uniform(0.05, 0.45)
  pairs = random_pairs(rng)
  flipped = (pairs[1], pairs[0], pairs[3], pairs[2], pairs[5], pairs[4])
  robust = ((1 - eps) * ours('robust', beta, eps, 0.0, *pairs)[0]
            + eps * ours('robust', beta, eps, 0.0, *flipped)[0])
  np.testing.assert_allclose(robust, ours('sigmoid', beta, 0.0, 0.0, *pairs)[0], rtol=1e-4,
                             atol=1e-5)


def test_reward_loss_is_the_ranking_loss(rng):
  chosen, rejected = rng.normal(0.0, 3.0, (2, 32)).astype(np.float32)
  margin = rng.uniform(0.0, 2.0, 32).astype(np.float32)
  np.testing.assert_allclose(np.asarray(reward_loss(chosen, rejected, margin)),
                             -log_sigmoid(chosen - rejected - margin), rtol=1e-5, atol=1e-6)


def trl_dpo(kinds, weights, beta, smoothing, pc, pr, rc, rr, nc, nr):
  """TRL's DPOTrainer loss (the weighted sum of its loss types) and logged metrics on
  precomputed reference log-probabilities: its loss method runs on a stand-in trainer whose
  model returns per-token log-probabilities that sum to pc, pr over each reply's nc, nr
  tokens."""
  torch = pytest.importorskip('torch')
  dpo_trainer = pytest.importorskip('trl.trainer.dpo_trainer')
  b, t = len(pc), int(max(nc.max(), nr.max())) + 2
  lengths = np.concatenate([nc, nr]).astype(int)
  mask = np.zeros((2 * b, t), np.int64)
  log_probs = np.zeros((2 * b, t - 1), np.float64)
  for row, n in enumerate(lengths):
    mask[row, 1:n + 1] = 1
    log_probs[row, :n] = np.concatenate([pc, pr])[row] / n
  outputs = types.SimpleNamespace(
      log_probs=torch.tensor(log_probs), entropy=torch.zeros(2 * b, t - 1),
      mean_logits=torch.zeros(2 * b, t - 1), is_top1=torch.zeros(2 * b, t - 1, dtype=bool))
  identity = lambda x: x
  trainer = types.SimpleNamespace(
      model=types.SimpleNamespace(training=True), aux_loss_enabled=False, ld_alpha=None,
      precompute_ref_logps=True, f_divergence_type='reverse_kl', loss_types=kinds,
      loss_weights=weights, beta=beta, label_smoothing=smoothing, use_weighting=False,
      accelerator=types.SimpleNamespace(device='cpu', gather_for_metrics=identity,
                                        gather=identity),
      _metrics=collections.defaultdict(lambda: collections.defaultdict(list)),
      _total_train_tokens=0, _tp_size=1)
  inputs = {'input_ids': torch.zeros(2 * b, t, dtype=torch.long),
            'attention_mask': torch.ones(2 * b, t, dtype=torch.long),
            'completion_mask': torch.tensor(mask),
            'ref_chosen_logps': torch.tensor(rc, dtype=torch.float64),
            'ref_rejected_logps': torch.tensor(rr, dtype=torch.float64)}
  loss = dpo_trainer.DPOTrainer._compute_loss(trainer, lambda **kwargs: outputs, inputs, False)
  return float(loss), {name: values[0] for name, values in trainer._metrics['train'].items()}


@pytest.mark.parametrize('kind', ('sigmoid', 'robust', 'hinge', 'ipo'))
def test_dpo_losses_and_metrics_match_trl(kind, rng):
  beta = rng.uniform(0.05, 1.0)
  smoothing = rng.uniform(0.05, 0.45) if kind == 'robust' else 0.0
  pairs = random_pairs(rng)
  expected_loss, metrics = trl_dpo([kind], [1.0], beta, smoothing, *pairs)
  loss, chosen, rejected = ours(kind, beta, smoothing, 0.0, *pairs)
  pc, pr = pairs[:2]
  np.testing.assert_allclose(loss.mean(), expected_loss, rtol=1e-5)
  ours_metrics = {'rewards/chosen': chosen.mean(), 'rewards/rejected': rejected.mean(),
                  'rewards/margins': (chosen - rejected).mean(),
                  'rewards/accuracies': (chosen > rejected).mean(),
                  'logps/chosen': pc.mean(), 'logps/rejected': pr.mean()}
  for name, value in ours_metrics.items():
    np.testing.assert_allclose(value, metrics[name], rtol=1e-5, atol=1e-6, err_msg=name)


def test_rpo_adds_the_chosen_replies_mean_token_nll_as_trl(rng):
  """RPO is TRL's loss types ['sigmoid', 'sft'] weighted [1, alpha]; its NLL is a mean over
  the batch's chosen tokens, which differs from the mean of per-pair means when lengths do."""
  beta, alpha = rng.uniform(0.05, 1.0), rng.uniform(0.1, 2.0)
  pairs = random_pairs(rng)
  expected_loss, _ = trl_dpo(['sigmoid', 'sft'], [1.0, alpha], beta, 0.0, *pairs)
  pc, nc = pairs[0], pairs[4]
  nll = float(chosen_nll(pc, nc, np.ones_like(pc)))
  np.testing.assert_allclose(nll, -pc.sum() / nc.sum(), rtol=1e-6)
  loss = ours('sigmoid', beta, 0.0, 0.0, *pairs)[0].mean() + alpha * nll
  np.testing.assert_allclose(loss, expected_loss, rtol=1e-5)


def test_simpo_matches_trl(rng):
  torch = pytest.importorskip('torch')
  cpo_trainer = pytest.importorskip('trl.experimental.cpo.cpo_trainer')
  beta, gamma, smoothing = rng.uniform(0.5, 3.0), rng.uniform(0.0, 1.5), rng.uniform(0.0, 0.3)
  pairs = random_pairs(rng)
  pc, pr, _, _, nc, nr = pairs
  trainer = types.SimpleNamespace(alpha=0.0, loss_type='simpo', beta=beta, simpo_gamma=gamma,
                                  label_smoothing=smoothing,
                                  accelerator=types.SimpleNamespace(device='cpu'))
  # SimPO's log-probabilities are per token (CPOTrainer averages them for simpo).
  losses, chosen, rejected = cpo_trainer.CPOTrainer.cpo_loss(
      trainer, torch.tensor(pc / nc, dtype=torch.float64), torch.tensor(pr / nr,
                                                                        dtype=torch.float64))
  loss, our_chosen, our_rejected = ours('simpo', beta, smoothing, gamma, *pairs)
  np.testing.assert_allclose(loss, losses.numpy(), rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(our_chosen, chosen.numpy(), rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(our_rejected, rejected.numpy(), rtol=1e-5, atol=1e-6)
