"""On 8 CPU devices: a training step under every mesh shape equals the one-device step,
parameters are split as the rules say, and checkpoints restore onto another topology.

Runs in its own process through tests/test_sharding.py (JAX must be started with 8 devices).
"""
import contextlib
import dataclasses
import json
import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from conftest import jit_call, small_config
from lmlab.models import sharding
from lmlab.models.errors import ConfigError
from lmlab.models.registry import build
from lmlab.training import parallel
from lmlab.training import steps as steps_lib
from lmlab.training.checkpoint import Checkpoints
from lmlab.training.config import TrainConfig
from lmlab.training.loop import train
from lmlab.training.optimizer import OptimizerConfig, make_optimizer

MESHES = ['data:8', 'fsdp:8', 'data:2,fsdp:2,tensor:2', 'fsdp:2,tensor:4']
# A mixture of experts with a shared expert and both router losses, its experts split over
# the expert axis (all-to-all in models/moe.py).
MOE = dict(moe_experts=8, moe_top_k=2, moe_ffn_dim=16, moe_shared_ffn_dim=16,
           moe_z_loss_weight=1e-3)


@pytest.fixture(autouse=True, scope='module')
def eight_devices():
  assert jax.device_count() == 8, 'start JAX with --xla_force_host_platform_device_count=8'


def random_batch(rng, config, batch, length):
  tokens = rng.integers(0, config.vocab_size, (batch, length + 1)).astype(np.int32)
  return {'inputs': tokens[:, :-1], 'targets': tokens[:, 1:]}


def one_step(config, host_params, batch, layout=None):
  """(loss, gradients, metrics) of one training step on `batch` as 2 micro-batches, on the
  first device or on layout's mesh. The optimizer is momentum with decay 0, whose state
  after the step is the gradient itself."""
  graphdef, _ = nnx.split(nnx.eval_shape(lambda: build(config, rngs=nnx.Rngs(0))))
  optimizer = optax.trace(decay=0.0)
  micro = {k: v.reshape(2, -1, *v.shape[1:]) for k, v in batch.items()}
  shardings, params = None, jax.device_put(host_params, jax.devices()[0])
  if layout is not None:
    params = jax.device_put(host_params, layout.state_shardings(host_params))
    micro = layout.put_batch(micro, batch_axis=1)
    shardings = (layout.state_shardings(params),
                 layout.state_shardings(jax.eval_shape(optimizer.init, params)),
                 {k: v.sharding for k, v in micro.items()}, layout.replicated, None)
  step = steps_lib.make_train_step(graphdef, optimizer, lambda step: 1.0, seed=0,
                                   use_dropout=False, shardings=shardings)
  with sharding.activation_rules(layout.rules) if layout else contextlib.nullcontext():
    new_params, opt_state, metrics = step(params, optimizer.init(params), micro, jnp.int32(3),
                                          None)
  return metrics, opt_state.trace, new_params


def assert_trees_close(actual, expected, **tolerance):
  for a, e in zip(jax.tree.leaves(actual), jax.tree.leaves(expected)):
    np.testing.assert_allclose(np.asarray(a), np.asarray(e), **tolerance)


@pytest.mark.parametrize('config_fields, meshes', [
    (dict(), MESHES),  # 4 heads, 2 KV heads: fewer than the tensor axis of fsdp:2,tensor:4.
    (dict(attention_type='mla', kv_lora_rank=16, q_lora_rank=8, qk_rope_head_dim=4,
          qk_nope_head_dim=4, v_head_dim=8, n_kv_heads=4), ['data:2,fsdp:2,tensor:2']),
    (MOE, ['data:2,expert:4', 'fsdp:2,expert:2,tensor:2']),
], ids=['gqa', 'mla', 'moe'])
def test_step_on_every_mesh_equals_one_device(rng, config_fields, meshes):
  # One layer has every kind of parameter; a second would add compiling, not cases.
  config = small_config(n_layers=1, **config_fields)
  params = nnx.split(build(config, rngs=nnx.Rngs(int(rng.integers(1 << 30)))))[1]
  params = jax.tree.map(np.asarray, params)
  batch = random_batch(rng, config, 8, 12)
  expected_metrics, expected_grads, _ = one_step(config, params, batch)
  for mesh in meshes:
    layout = parallel.Layout.create(mesh, '', config)
    metrics, grads, new_params = one_step(config, params, batch, layout)
    assert set(metrics) == set(expected_metrics)
    for name in ('loss', 'grad_norm', *(m for m in metrics if m.startswith('moe_'))):
      np.testing.assert_allclose(float(metrics[name]), float(expected_metrics[name]),
                                 rtol=1e-5, err_msg=f'{mesh} {name}')
    assert_trees_close(grads, expected_grads, rtol=1e-4, atol=1e-7, err_msg=mesh)
    embedding = new_params['embed']['embedding'][...]
    assert embedding.sharding == layout.rules.sharding((sharding.VOCAB, sharding.EMBED),
                                                       embedding.shape), mesh
    if config.moe_experts:
      down = new_params['blocks'][0]['mlp']['expert_down'][...]
      experts_per_device = config.moe_experts // layout.mesh.shape['expert']
      assert down.addressable_shards[0].data.shape[0] == experts_per_device, mesh


def expected_spec(axes, shape, mesh_shape):
  """The rules of models/sharding.py written out for the default mapping: embed over fsdp,
  heads/kv_heads/mlp/vocab over tensor, a dimension split only into whole units."""
  default = {'embed': 'fsdp', 'heads': 'tensor', 'kv_heads': 'tensor', 'mlp': 'tensor',
             'vocab': 'tensor'}
  units = {'heads': 4, 'kv_heads': 2}
  spec = []
  for name, size in zip(axes, shape):
    axis = default.get(name)
    whole = units.get(name, size)
    spec.append(axis if axis and whole % mesh_shape[axis] == 0 else None)
  return tuple(spec)


@pytest.mark.parametrize('mesh', ['fsdp:8', 'fsdp:2,tensor:4'])
def test_parameters_are_split_as_the_rules_say(mesh):
  config = small_config(vocab_size=64)
  layout = parallel.Layout.create(mesh, '', config)
  mesh_shape = dict(layout.mesh.shape)
  params = nnx.split(build(config, rngs=nnx.Rngs(0)))[1]
  placed = jax.device_put(params, layout.state_shardings(params))
  expected_bytes = 0
  for path, variable in nnx.to_flat_state(placed):
    value, axes = variable[...], sharding.logical_axes(variable)
    spec = expected_spec(axes, value.shape, mesh_shape)
    assert tuple(value.sharding.spec) + (None,) * (value.ndim - len(value.sharding.spec)) == \
        spec, path
    pieces = math.prod(mesh_shape[a] for a in spec if a)
    assert value.addressable_shards[0].data.shape == tuple(
        size // (mesh_shape[a] if a else 1) for size, a in zip(value.shape, spec)), path
    expected_bytes += value.nbytes // pieces
  assert parallel.bytes_per_device(placed) == expected_bytes
  if mesh == 'fsdp:8':
    # ZeRO-3: everything but the norm scales is divided by the fsdp size.
    norms = sum(v[...].nbytes for p, v in nnx.to_flat_state(placed) if v[...].ndim == 1)
    total = sum(v[...].nbytes for p, v in nnx.to_flat_state(placed))
    assert expected_bytes == (total - norms) // 8 + norms
  else:
    # k/v projections have 2 KV heads for 4 tensor devices: whole on every device.
    k_spec = placed['blocks'][0]['attention']['k_proj']['kernel'][...].sharding.spec
    assert 'tensor' not in tuple(k_spec)


def test_logical_rules_from_the_command_line():
  config = small_config(vocab_size=64)
  layout = parallel.Layout.create('fsdp:2,tensor:4', 'embed:none,mlp:fsdp+tensor', config)
  params = nnx.split(build(config, rngs=nnx.Rngs(0)))[1]
  shardings = layout.state_shardings(params)
  up = shardings['blocks'][0]['mlp']['up']['kernel'].get_value()
  assert tuple(up.spec) == (None, ('fsdp', 'tensor'))
  assert tuple(shardings['embed']['embedding'].get_value().spec) == ('tensor', None)


def trained_two_steps(tmp_path, rng, config, mesh: str):
  """(the parameters as numpy arrays, config with the run's vocab_size) of 2 steps on `mesh`
  in tmp_path/run, on a random corpus of words, saved at the end."""
  text = ' '.join(rng.choice(['alpha', 'beta', 'gamma', 'delta', '(', ')', '\n'], 3000))
  (tmp_path / 'corpus.txt').write_text(text)
  run = TrainConfig(workdir=str(tmp_path / 'run'), steps=2, batch_size=8, seq_len=16,
                    data=str(tmp_path / 'corpus.txt'), eval_batches=1, save_every=2,
                    mesh=mesh, log_every=1)
  params = train(run, config, OptimizerConfig(warmup_steps=0, total_steps=2),
                 print_fn=lambda *a: None)[0]
  vocab_size = json.loads((tmp_path / 'run' / 'config.json').read_text())['model']['vocab_size']
  return jax.tree.map(np.asarray, params), dataclasses.replace(config, vocab_size=vocab_size)


def test_checkpoint_restores_onto_other_topologies(tmp_path, rng):
  """Train on a 2x2x2 mesh, restore onto 1 device; save from 1 device, restore onto 4."""
  saved, config = trained_two_steps(tmp_path, rng, small_config(vocab_size=0, n_layers=1),
                                    'data:2,fsdp:2,tensor:2')
  with open(tmp_path / 'run' / 'metrics.jsonl') as f:
    first = json.loads(f.readline())
  assert first['devices'] == 8 and first['step_temp_bytes'] > 0
  assert first['param_bytes_per_device'] < sum(x.nbytes for x in jax.tree.leaves(saved)) / 3

  optimizer = make_optimizer(OptimizerConfig().resolved(steps=10, family='decoder'))
  abstract = jax.eval_shape(lambda: nnx.split(build(config, rngs=nnx.Rngs(0)))[1])
  checkpoints = Checkpoints(str(tmp_path / 'run'))
  on_one, opt_state, _ = checkpoints.restore(2, abstract, optimizer.init)
  checkpoints.close()
  assert_trees_close(on_one, saved, rtol=0, atol=0)
  assert all(len(x.devices()) == 1 for x in jax.tree.leaves((on_one, opt_state)))

  one_device = Checkpoints(str(tmp_path / 'single'))
  one_device.save(5, {'params': on_one, 'opt_state': opt_state}, {'step': 5})
  four = parallel.Layout.create('fsdp:2,tensor:2', '', config, devices=jax.devices()[4:])
  on_four, _, _ = one_device.restore(5, abstract, optimizer.init, place=four.abstract)
  one_device.close()
  assert_trees_close(on_four, saved, rtol=0, atol=0)
  expected = four.state_shardings(abstract)
  for restored, wanted in zip(jax.tree.leaves(on_four), jax.tree.leaves(expected)):
    assert restored.sharding == wanted


def test_experts_exchange_tokens_by_all_to_all(rng):
  """Under an expert axis the MoE layer's tokens travel by all-to-all, and its logits are
  one device's."""
  config = small_config(n_layers=1, **MOE)
  layout = parallel.Layout.create('data:2,expert:4', '', config)
  graphdef, params = nnx.split(build(config, rngs=nnx.Rngs(int(rng.integers(1 << 30)))))
  tokens = rng.integers(0, config.vocab_size, (8, 12)).astype(np.int32)
  forward = jax.jit(lambda params, tokens: nnx.merge(graphdef, params)(tokens))
  expected = forward(params, tokens)
  placed = jax.device_put(params, layout.state_shardings(params))
  with sharding.activation_rules(layout.rules):
    compiled = forward.lower(placed, layout.put_batch({'t': tokens})['t']).compile()
  assert 'all-to-all' in compiled.as_text()
  np.testing.assert_allclose(np.asarray(compiled(placed, layout.put_batch({'t': tokens})['t'])),
                             np.asarray(expected), rtol=1e-5, atol=1e-5)


def test_mixture_of_experts_restores_across_expert_meshes(tmp_path, rng):
  """Trained with its experts split 4 ways, restored onto one device and onto 2 experts ways
  of 2 devices, bit for bit; a bad split is one error naming the field."""
  saved, config = trained_two_steps(tmp_path, rng, small_config(vocab_size=0, n_layers=1, **MOE),
                                    'data:2,expert:4')
  optimizer = make_optimizer(OptimizerConfig().resolved(steps=10, family='decoder'))
  abstract = jax.eval_shape(lambda: nnx.split(build(config, rngs=nnx.Rngs(0)))[1])
  checkpoints = Checkpoints(str(tmp_path / 'run'))
  on_one, _, _ = checkpoints.restore(2, abstract, optimizer.init)
  two = parallel.Layout.create('expert:2', '', config, devices=jax.devices()[:2])
  on_two, _, _ = checkpoints.restore(2, abstract, optimizer.init, place=two.abstract)
  checkpoints.close()
  assert_trees_close(on_one, saved, rtol=0, atol=0)
  assert_trees_close(on_two, saved, rtol=0, atol=0)
  assert on_two['blocks'][0]['mlp']['expert_up'][...].addressable_shards[0].data.shape[0] == 4
  with pytest.raises(ConfigError, match='moe_experts=8 is not divisible'):
    parallel.Layout.create('expert:-1', '', config, devices=jax.devices()[:3])
  with pytest.raises(ConfigError, match='moe_compute=capacity is not implemented'):
    parallel.Layout.create('expert:2', '', dataclasses.replace(config, moe_compute='capacity'),
                           devices=jax.devices()[:2])


@pytest.mark.parametrize('fields, mesh, rules', [
    (dict(n_kv_heads=4, position='alibi'), 'data:2,tensor:4', ''),  # KV heads split alike
    (dict(n_kv_heads=2), 'fsdp:2,tensor:4', ''),  # KV heads whole: each shard slices 1
    (dict(n_heads=8, n_kv_heads=4), 'data:4,tensor:2', 'kv_heads:none'),  # slices 2 of 4
])
def test_pallas_kernel_runs_per_shard(rng, fields, mesh, rules):
  """A custom kernel (Pallas, interpreted on CPU) under a mesh runs shard by shard in
  shard_map; the logits equal the plain implementation's on one device."""
  config = small_config(attention_impl='pallas', n_layers=1, **fields)
  graphdef, params = nnx.split(build(config, rngs=nnx.Rngs(int(rng.integers(1 << 30)))))
  tokens = rng.integers(0, config.vocab_size, (4, 9)).astype(np.int32)
  segments = np.sort(rng.integers(0, 2, (4, 9)), axis=1).astype(np.int32)
  plain = nnx.merge(graphdef, params)
  plain.set_attributes(impl='xla')
  expected = jit_call(plain)(tokens, segment_ids_bt=segments)
  layout = parallel.Layout.create(mesh, rules, config)
  placed = jax.device_put(jax.tree.map(np.asarray, params), layout.state_shardings(params))
  batch = layout.put_batch({'tokens': tokens, 'segments': segments})
  forward = jax.jit(lambda p, b: nnx.merge(graphdef, p)(b['tokens'],
                                                        segment_ids_bt=b['segments']))
  with sharding.activation_rules(layout.rules):
    logits = forward(placed, batch)
    hlo = forward.lower(placed, batch).as_text()
  np.testing.assert_allclose(np.asarray(logits), np.asarray(expected), rtol=1e-5, atol=1e-5)
  assert 'manual' in hlo.lower()  # The sharding of shard_map's body.
