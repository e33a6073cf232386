"""The mixture-of-experts layer (models/moe.py) against a token-by-token numpy reference of
its routing and experts, GShard's capacity rule, and transformers' load-balancing loss."""
import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from conftest import small_config
from lmlab.models import config as config_lib
from lmlab.models import moe
from lmlab.models.errors import ConfigError
from lmlab.models.registry import active_param_count, param_count
from lmlab.training import steps as steps_lib
from lmlab.training.optimizer import OptimizerConfig, make_optimizer, schedule
from test_model import build, check_cached_decoding_equals_full_forward, random_tokens

ACTIVATIONS = {'swiglu': lambda x: x / (1 + np.exp(-x)),
               'relu': lambda x: np.maximum(x, 0.0)}


def moe_config(**fields):
  return small_config(**{'moe_experts': 6, 'moe_top_k': 2, 'moe_ffn_dim': 16, **fields})


def random_layer(config, rng):
  """An MoE layer of config whose every parameter is drawn at random."""
  layer = moe.MoE(config, init_scale=1.0, dtype=jnp.float32, param_dtype=jnp.float32,
                  rngs=nnx.Rngs(int(rng.integers(1 << 30))))
  graphdef, state = nnx.split(layer)
  state = jax.tree.map(lambda x: jnp.asarray(rng.normal(0, 0.3, x.shape), x.dtype), state)
  return nnx.merge(graphdef, state)


def expert_output(x_d, gate, up, down, kind):
  hidden = ACTIVATIONS[kind](x_d @ gate) * (x_d @ up) if gate is not None else \
      ACTIVATIONS[kind](x_d @ up)
  return hidden @ down


def reference(layer, x_nd, config):
  """Each token on its own: softmax of its router logits, its k experts (within its best
  groups), their weights, and the weighted sum of their outputs, plus the shared expert."""
  arrays = lambda v: None if v is None else np.asarray(v[...], np.float64)
  router = arrays(layer.router.kernel)
  gate, up, down = map(arrays, (layer.expert_gate, layer.expert_up, layer.expert_down))
  out = np.zeros_like(x_nd)
  e, k = config.moe_experts, config.moe_top_k
  for n, x_d in enumerate(x_nd):
    logits = x_d @ router
    probs = np.exp(logits - logits.max())
    probs /= probs.sum()
    candidates = np.arange(e)
    if config.moe_groups:
      size = e // config.moe_groups
      best = [probs[g * size:(g + 1) * size].max() for g in range(config.moe_groups)]
      groups = np.argsort(best)[::-1][:config.moe_topk_groups]
      candidates = np.concatenate([np.arange(g * size, (g + 1) * size) for g in groups])
    chosen = candidates[np.argsort(probs[candidates])[::-1][:k]]
    if config.moe_router == 'topk_softmax':
      weights = np.exp(logits[chosen] - logits[chosen].max())
      weights /= weights.sum()
    else:
      weights = probs[chosen] / (probs[chosen].sum() if config.moe_norm_topk else 1.0)
    weights = weights * config.moe_routed_scale
    for j, w in zip(chosen, weights):
      out[n] += w * expert_output(x_d, None if gate is None else gate[j], up[j], down[j],
                                  config.mlp)
    if layer.shared is not None:
      shared = layer.shared
      s = expert_output(x_d, arrays(shared.gate.kernel), arrays(shared.up.kernel),
                        arrays(shared.down.kernel), config.mlp)
      if layer.shared_gate is not None:
        s = s / (1 + np.exp(-(x_d @ arrays(layer.shared_gate.kernel))))
      out[n] += s
  return out


ROUTINGS = {
    'switch': dict(moe_top_k=1),
    'softmax-topk': dict(),
    'softmax-topk-normalised': dict(moe_norm_topk=True, moe_top_k=3),
    'mixtral': dict(moe_router='topk_softmax'),
    'deepseek': dict(moe_groups=3, moe_topk_groups=2, moe_routed_scale=1.5,
                     moe_shared_ffn_dim=24),
    'qwen2-moe': dict(moe_shared_ffn_dim=20, moe_shared_gate=True, moe_norm_topk=True),
    'relu-experts': dict(mlp='relu', moe_router='topk_softmax', moe_top_k=3),
}


# Each way to compute the experts: a moe_compute, and for dropless a moe_matmul.
COMPUTES = [dict(moe_compute=compute) for compute in config_lib.MOE_COMPUTES if
            compute != 'dropless'] + [dict(moe_matmul=matmul) for matmul in
                                      config_lib.MOE_MATMULS if matmul != 'auto']


@pytest.mark.parametrize('compute', COMPUTES, ids=lambda c: '-'.join(c.values()))
@pytest.mark.parametrize('routing', list(ROUTINGS))
def test_every_router_and_compute_matches_the_token_by_token_reference(routing, compute, rng):
  # Room for every assignment: nothing is dropped.
  config = moe_config(**ROUTINGS[routing], **compute, moe_capacity_factor=6.0)
  layer = random_layer(config, rng)
  x_btd = rng.normal(size=(2, 7, config.d_model)).astype(np.float32)
  got = jax.jit(lambda x: layer(x))(jnp.asarray(x_btd))
  expected = reference(layer, x_btd.reshape(14, -1).astype(np.float64), config)
  np.testing.assert_allclose(np.asarray(got).reshape(14, -1), expected, rtol=1e-4, atol=1e-5)


def test_capacity_drops_what_gshard_drops(rng):
  """Each expert keeps its first ceil(factor * N * k / E) assignments, taking every token's
  first choice before any second one; a dropped assignment adds nothing."""
  factor = float(rng.uniform(0.3, 0.9))
  config = moe_config(moe_compute='capacity', moe_capacity_factor=factor)
  layer = random_layer(config, rng)
  x_nd = rng.normal(size=(1, 16, config.d_model)).astype(np.float32)
  graphdef, state = nnx.split(layer)
  got, stats = jax.jit(lambda state, x: nnx.capture(nnx.merge(graphdef, state),
                                                    nnx.Intermediate)(x))(state, jnp.asarray(x_nd))
  record, = nnx.to_flat_state(stats)[0][1].get_value()

  x64 = x_nd[0].astype(np.float64)
  e, k = config.moe_experts, config.moe_top_k
  capacity = int(np.ceil(factor * 16 * k / e))
  logits = x64 @ np.asarray(layer.router.kernel[...], np.float64)
  probs = np.exp(logits - logits.max(1, keepdims=True))
  probs /= probs.sum(1, keepdims=True)
  chosen = np.argsort(-probs, axis=1)[:, :k]
  taken, expected, dropped = np.zeros(e, int), np.zeros_like(x64), 0
  arrays = lambda v: np.asarray(v[...], np.float64)
  for choice in range(k):
    for n in range(16):
      j = chosen[n, choice]
      if taken[j] == capacity:
        dropped += 1
        continue
      taken[j] += 1
      expected[n] += probs[n, j] * expert_output(x64[n], arrays(layer.expert_gate)[j],
                                                 arrays(layer.expert_up)[j],
                                                 arrays(layer.expert_down)[j], 'swiglu')
  assert dropped > 0
  np.testing.assert_allclose(np.asarray(got[0]), expected, rtol=1e-4, atol=1e-5)
  np.testing.assert_allclose(float(record['dropped']), dropped / (16 * k), rtol=1e-6)


def test_balance_and_z_losses_are_transformers_and_st_moe(rng):
  """balance: transformers' load_balancing_loss_func for one layer; z: ST-MoE's mean squared
  log-partition of the router logits."""
  torch = pytest.importorskip('torch')
  mixtral = pytest.importorskip('transformers.models.mixtral.modeling_mixtral')
  e, k = 8, int(rng.integers(1, 4))
  logits = rng.normal(0, 2, (40, e)).astype(np.float32)
  config = moe_config(moe_experts=e, moe_top_k=k, moe_aux_loss_weight=0.03,
                      moe_z_loss_weight=0.002)
  experts, _, probs = moe.route(jnp.asarray(logits), config)
  stats = moe.router_stats(jnp.asarray(logits), probs, experts, jnp.zeros(()))
  state = nnx.State({'blocks': {0: {'mlp': {moe.STATS: nnx.Intermediate((stats,))}}}})
  total, metrics = moe.router_losses(state, config)
  expected = float(mixtral.load_balancing_loss_func((torch.tensor(logits),), e, k))
  np.testing.assert_allclose(float(metrics['moe_balance']), expected, rtol=1e-5)
  log_z = np.log(np.exp(logits.astype(np.float64)).sum(1))
  np.testing.assert_allclose(float(metrics['moe_z']), np.mean(log_z ** 2), rtol=1e-5)
  np.testing.assert_allclose(float(total), 0.03 * expected + 0.002 * np.mean(log_z ** 2),
                             rtol=1e-5)


def test_training_adds_the_weighted_router_losses_of_every_moe_layer(rng):
  """The loss a step minimises is the cross-entropy plus the weighted mean of the MoE layers'
  losses (here layers 1 and 3 of 4: moe_first_dense=1, moe_layer_freq=2)."""
  weight = float(rng.uniform(0.01, 0.1))
  config = moe_config(n_layers=4, moe_first_dense=1, moe_layer_freq=2,
                      moe_aux_loss_weight=weight)
  assert [config.is_moe_layer(i) for i in range(4)] == [False, True, False, True]
  model = build(config, rng)
  tokens = random_tokens(rng, config, (2, 9))

  def loss(model, tokens):
    return jnp.mean(model(tokens)), {'loss': jnp.zeros(())}

  total, metrics = jax.jit(moe.with_router_losses(loss))(model, tokens)
  (plain, _), stats = jax.jit(nnx.capture(loss, nnx.Intermediate))(model, tokens)
  records = [record for _, calls in nnx.to_flat_state(stats) for record in calls.get_value()]
  assert len(records) == 2
  balances = [config.moe_experts * np.sum(np.asarray(r['load']) * np.asarray(r['probability']))
              for r in records]
  np.testing.assert_allclose(float(metrics['moe_balance']), np.mean(balances), rtol=1e-5)
  np.testing.assert_allclose(float(total), float(plain) + weight * np.mean(balances), rtol=1e-5)
  for layer, record in zip((1, 3), records):
    load = np.asarray(record['load'])
    np.testing.assert_allclose(np.sum(load), config.moe_top_k, rtol=1e-6)
    np.testing.assert_allclose(float(metrics[f'moe_max_load_{layer}']),
                               load.max() / config.moe_top_k, rtol=1e-6)


def test_balance_metric_of_a_mixtral_checkpoint_is_transformers_aux_loss(rng, tmp_path):
  """A one-layer Mixtral's aux_loss (transformers, output_router_logits) is our moe_balance."""
  torch = pytest.importorskip('torch')
  from test_hf import hf_model
  from lmlab.models import hf
  model = hf_model('Mixtral', dict(num_hidden_layers=1, output_router_logits=True),
                   int(rng.integers(1 << 30)))
  model.save_pretrained(tmp_path / 'hf')
  ours = hf.load(str(tmp_path / 'hf'))
  ids = rng.integers(3, 97, (2, 11))
  with torch.no_grad():
    expected = float(model(torch.tensor(ids)).aux_loss)
  _, metrics = jax.jit(moe.with_router_losses(
      lambda m, x: (jnp.mean(m(x)), {})))(ours, jnp.asarray(ids))
  np.testing.assert_allclose(float(metrics['moe_balance']), expected, rtol=1e-5)


def test_cached_decoding_of_a_mixture_of_experts(rng):
  check_cached_decoding_equals_full_forward(
      moe_config(moe_shared_ffn_dim=8, moe_first_dense=1), rng)


def test_moe_model_trains_with_falling_loss_and_reports_routing(rng):
  config = moe_config(moe_z_loss_weight=1e-3)
  graphdef, params = nnx.split(build(config, rng))
  opt_config = OptimizerConfig(learning_rate=1e-2, warmup_steps=2, total_steps=20)
  optimizer = make_optimizer(opt_config)
  opt_state = optimizer.init(params)
  step = steps_lib.make_train_step(graphdef, optimizer, schedule(opt_config), seed=0,
                                   use_dropout=False)
  tokens = random_tokens(rng, config, (1, 4, 17))
  losses = []
  for i in range(20):
    params, opt_state, metrics = step(params, opt_state, {'inputs': tokens[..., :-1],
                                                          'targets': tokens[..., 1:]},
                                      jnp.int32(i))
    losses.append(float(metrics['loss']))
  assert losses[-1] < 0.75 * losses[0], losses
  assert 1.0 / 6 <= float(metrics['moe_load_entropy']) <= 1.0
  assert float(metrics['moe_balance']) >= config.moe_top_k * (1 - 1e-5)  # k at best
  assert float(metrics['moe_dropped']) == 0.0


# Published sizes, in billions: Mixtral of experts (Jiang et al. 2024: 46.7B, 12.9B active),
# Qwen2 (Yang et al. 2024: 57B, 14B active), DeepSeek-V2 (2024: 15.7B, 2.4B active). The
# DeepSeek figure leaves out the input embedding (a lookup) and is cut, not rounded: 2.45B.
@pytest.mark.parametrize('name, total, active', [
    ('mixtral-8x7b', 46.7, 12.9), ('qwen2-57b-a14b', 57, 14), ('deepseek-v2-lite', 15.7, 2.4)])
def test_moe_presets_have_the_published_total_and_active_sizes(name, total, active):
  config = config_lib.preset(name)
  billions = lambda count: round(count / 1e9, 1 if isinstance(total, float) else 0)
  assert billions(param_count(config)) == total
  if name == 'deepseek-v2-lite':
    without_embedding = active_param_count(config) - config.vocab_size * config.d_model
    assert int(without_embedding / 1e8) / 10 == active
  else:
    assert billions(active_param_count(config)) == active


def test_active_parameters_leave_out_the_unchosen_experts(rng):
  e, k, f = int(rng.integers(2, 9)), 1, int(rng.integers(4, 20))
  k = int(rng.integers(1, e + 1))
  config = moe_config(moe_experts=e, moe_top_k=k, moe_ffn_dim=f, n_layers=3, moe_first_dense=1)
  dense = dataclasses.replace(config, **{name: getattr(config_lib.ModelConfig, name)
                                         for name in ('moe_experts', *config_lib.MOE_FIELDS)})
  router_and_experts = 2 * (config.d_model * e + e * 3 * config.d_model * f)
  dense_mlps = 2 * 3 * config.d_model * config.ffn_dim
  assert param_count(config) == param_count(dense) - dense_mlps + router_and_experts
  assert param_count(config) - active_param_count(config) == 2 * (e - k) * 3 * config.d_model * f


@pytest.mark.parametrize('fields, message', [
    (dict(moe_experts=4, moe_top_k=5), 'moe_top_k=5'),
    (dict(moe_top_k=3), 'moe_top_k=3 applies to a mixture of experts only'),
    (dict(moe_experts=4, moe_router='sigmoid'), "moe_router='sigmoid'"),
    (dict(moe_experts=4, moe_groups=3, moe_topk_groups=1), 'moe_groups=3 must divide'),
    (dict(moe_experts=4, moe_shared_gate=True), 'moe_shared_gate'),
    (dict(moe_experts=4, moe_router='topk_softmax', moe_norm_topk=True), 'moe_norm_topk'),
    (dict(moe_experts=4, use_bias=True), 'use_bias'),
    (dict(moe_experts=4, moe_capacity_factor=0.0), 'moe_capacity_factor'),
    (dict(moe_experts=4, peft='lora', lora_targets='q,up'), 'LoRA of a mixture of experts'),
])
def test_bad_moe_settings_are_one_error_naming_the_field(fields, message):
  with pytest.raises(ConfigError, match=message):
    small_config(**fields)


def test_mfu_counts_the_chosen_experts_and_the_router(rng):
  """k experts of width f cost what one MLP of width k * f does, plus the router [D, E]."""
  from lmlab.training import mfu
  e, f = int(rng.integers(2, 9)), int(rng.integers(4, 20))
  k = int(rng.integers(1, e + 1))
  config = moe_config(moe_experts=e, moe_top_k=k, moe_ffn_dim=f)
  dense = small_config(ffn_dim=k * f)
  assert mfu.matmul_params(config) == (mfu.matmul_params(dense)
                                       + config.n_layers * config.d_model * e)
