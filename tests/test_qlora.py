"""QLoRA (models/quantize.py, models/lora.py with lora_quantize): the block-wise quantisation
against a numpy implementation of the scheme, NF4 against the paper's construction and its
error against the code spacing, and a QLoRA model against a float LoRA model whose kernels are
those de-quantised: in its forward, its training and when pre-trained parameters load into it.
"""
import math
from statistics import NormalDist

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from conftest import small_config
from lmlab.models import lora, quantize, registry
from lmlab.models.config import without_peft
from lmlab.models.errors import ConfigError
from lmlab.training import run as run_lib
from lmlab.models.lora import TARGET_PATHS
from lmlab.training.optimizer import OptimizerConfig, make_optimizer, schedule
from lmlab.training.steps import make_train_step, trainable_part

F32 = np.float32


def nf4_from_normal_quantiles():
  """NormalFloat4 as the paper builds it: quantiles of N(0, 1) at equal steps of probability,
  8 for the positive half and 7 for the negative, with an exact zero, scaled to [-1, 1]; the
  outermost probability is the mean of 1 - 1/(2*15) and 1 - 1/(2*16)."""
  outer = (1 - 1 / 30 + 1 - 1 / 32) / 2
  quantile = NormalDist().inv_cdf
  positive = [quantile(p) for p in np.linspace(outer, 0.5, 9)[:-1]]
  negative = [-quantile(p) for p in np.linspace(outer, 0.5, 8)[:-1]]
  values = np.sort(np.array(positive + [0.0] + negative))
  return values / values.max()


def np_over_absmax(rows):
  absmax = np.abs(rows).max(axis=1)
  return rows * (F32(1) / np.where(absmax == 0, F32(1), absmax))[:, None], absmax


def np_quantize(w, scheme, block, mean):
  """The scheme of models/quantize.py in numpy, float32 throughout; `mean` is the absmax
  constants' mean (a float32 sum, whose order of additions numpy does not share with XLA)."""
  flat = np.asarray(w, F32).reshape(-1)
  rows = np.pad(flat, (0, -flat.size % block)).reshape(-1, block)
  quotients, absmax = np_over_absmax(rows)
  if scheme == 'int8':
    codes = np.round(quotients * F32(127)).astype(np.int8).reshape(-1)
  else:
    values = np.asarray(quantize.NF4_VALUES, F32)
    midpoints = (values[:-1] + values[1:]) / F32(2)
    index = (quotients[..., None] > midpoints).sum(axis=-1).astype(np.uint8).reshape(-1)
    codes = index[0::2] * np.uint8(16) + index[1::2]
  centred = absmax - F32(mean)
  groups = np.pad(centred, (0, -centred.size % 256)).reshape(-1, 256)
  group_quotients, group_scales = np_over_absmax(groups)
  scale_codes = np.round(group_quotients * F32(127)).astype(np.int8).reshape(-1)
  return codes, scale_codes, group_scales, absmax


def np_dequantize(codes, scale_codes, group_scales, mean, scheme, block, shape):
  size = math.prod(shape)
  n_blocks = -(-size // block)
  absmax = ((scale_codes.reshape(-1, 256).astype(F32) * group_scales[:, None] * F32(1 / 127))
            .reshape(-1)[:n_blocks] + F32(mean))
  if scheme == 'int8':
    values = codes.reshape(n_blocks, block).astype(F32) * absmax[:, None] * F32(1 / 127)
  else:
    index = np.stack([codes // 16, codes % 16], axis=-1).reshape(n_blocks, block)
    values = np.asarray(quantize.NF4_VALUES, F32)[index] * absmax[:, None]
  return values.reshape(-1)[:size].reshape(shape)


def np_roundtrip(w, scheme, block):
  """w quantised and de-quantised in numpy (the absmax mean summed in float64)."""
  flat = np.asarray(w, F32).reshape(-1)
  absmax = np.abs(np.pad(flat, (0, -flat.size % block)).reshape(-1, block)).max(axis=1)
  mean = F32(absmax.astype(np.float64).mean())
  codes, scale_codes, group_scales, _ = np_quantize(w, scheme, block, mean)
  return np_dequantize(codes, scale_codes, group_scales, mean, scheme, block, w.shape)


def random_matrix(rng, shape):
  """Normal weights of a random scale, with a few outliers and one all-zero stretch."""
  w = rng.standard_normal(shape) * rng.uniform(0.005, 2.0)
  w.flat[rng.integers(0, w.size, 3)] *= 20
  start = int(rng.integers(0, w.size))
  w.flat[start:start + 70] = 0
  return w.astype(F32)


def test_nf4_values_are_the_papers_normal_quantiles():
  # The appendix lists the construction's float32 results: within a few float32 ulps.
  np.testing.assert_allclose(quantize.NF4_VALUES, nf4_from_normal_quantiles(), rtol=0,
                             atol=2 ** -21)


@pytest.mark.parametrize('scheme', ['int8', 'nf4'])
@pytest.mark.parametrize('ragged', [False, True], ids=['whole_blocks', 'ragged_last_block'])
def test_quantize_is_the_numpy_scheme_exactly(rng, scheme, ragged):
  block = int(rng.choice([16, 32, 64]))
  # Over 256 blocks, so that the absmax constants fill more than one group of 256; odd sides
  # leave the last block short (padded with zeros).
  rows, cols = int(rng.integers(45, 65)) * 2 + 1, int(rng.integers(3, 5)) * block
  shape = (rows, cols + 1) if ragged else (rows, cols)
  w = random_matrix(rng, shape)
  assert (w.size % block != 0) == ragged
  codes, scale_codes, group_scales, mean = map(np.asarray, quantize.quantize(w, scheme, block))
  expected = np_quantize(w, scheme, block, mean)
  absmax = expected[3]
  assert absmax.size > 256
  # A float32 sum of n positive terms is within (n - 1) * 2^-24 of the exact one, relatively.
  np.testing.assert_allclose(mean, absmax.astype(np.float64).mean(), rtol=absmax.size * 2 ** -24,
                             atol=0)
  np.testing.assert_array_equal(codes, expected[0])
  np.testing.assert_array_equal(scale_codes, expected[1])
  np.testing.assert_array_equal(group_scales, expected[2])
  restored = quantize.dequantize(codes, scale_codes, group_scales, mean, scheme=scheme,
                                 block=block, shape=shape, dtype=jnp.float32)
  np.testing.assert_array_equal(
      np.asarray(restored),
      np_dequantize(codes, scale_codes, group_scales, mean, scheme, block, shape))


def test_nf4_error_is_within_half_the_gap_between_codes(rng):
  block = 64
  w = (rng.standard_normal((96, 160)) * rng.uniform(0.005, 2.0)).astype(F32)
  codes, scale_codes, group_scales, mean = map(np.asarray, quantize.quantize(w, 'nf4', block))
  restored = np.asarray(quantize.dequantize(codes, scale_codes, group_scales, mean,
                                            scheme='nf4', block=block, shape=w.shape,
                                            dtype=jnp.float32), np.float64)
  rows = w.reshape(-1, block).astype(np.float64)
  absmax = np.abs(rows).max(axis=1, keepdims=True)
  stored_absmax = (scale_codes[:absmax.size].astype(np.float64)
                   * np.repeat(group_scales, 256)[:absmax.size] / 127 + mean)[:, None]
  # Each quotient w / absmax lies between two adjacent codes and goes to the nearer: it is off
  # by at most half their gap. Storing absmax in 8 bits changes each value by at most
  # |code| * |absmax error|; the float32 divide and multiply, by 2^-23 * absmax.
  values = np.asarray(quantize.NF4_VALUES)
  gap = np.diff(values)[np.clip(np.searchsorted(values, rows / absmax) - 1, 0, 14)]
  bound = absmax * (gap / 2 + 2 ** -23) + np.abs(stored_absmax - absmax)
  assert np.all(np.abs(restored.reshape(rows.shape) - rows) <= bound)
  # The paper's point: for normal weights NF4 is closer than 4-bit integers in the same
  # range (15 levels, round(7 x) / 7), whose mean error is about a quarter of their step.
  int4 = np.round(rows / absmax * 7) / 7 * absmax
  nf4_error = np.mean(np.abs(restored.reshape(rows.shape) - rows) / absmax)
  assert nf4_error < np.mean(np.abs(int4 - rows) / absmax)


def qlora_config(scheme, **fields):
  return small_config(**{'peft': 'lora', 'lora_rank': 4, 'lora_targets': 'q,v,o,down',
                         'lora_quantize': scheme, 'lora_quantize_block': 32, **fields})


def randomise_adapters(model, rng, std=0.05):
  for _, variable in nnx.to_flat_state(nnx.state(model, nnx.LoRAParam)):
    variable[...] = jnp.asarray(std * rng.standard_normal(variable.shape), variable.dtype)


def float_twin(qlora_model, kernels):
  """A float LoRA model with qlora_model's adapters and other parameters, each adapted kernel
  the numpy round trip of kernels[path]."""
  config = qlora_model.config
  twin = registry.build(lora.float_config(config), rngs=nnx.Rngs(0))
  nnx.update(twin, nnx.state(qlora_model, nnx.Param))
  for path, kernel in kernels.items():
    _, i, sublayer, layer = path[:4]
    getattr(getattr(twin.blocks[i], sublayer), layer).kernel[...] = jnp.asarray(
        np_roundtrip(kernel, config.lora_quantize, config.lora_quantize_block))
  return twin


def adapted_kernel_paths(config):
  return [('blocks', i, *TARGET_PATHS[name], 'kernel') for i in range(config.n_layers)
          for name in config.lora_target_names]


def logits(model, tokens):
  graphdef, state = nnx.split(model)
  return np.asarray(jax.jit(lambda state, t: nnx.merge(graphdef, state)(t))(state, tokens))


@pytest.mark.parametrize('scheme', ['int8', 'nf4'])
def test_qlora_model_is_lora_with_dequantized_kernels(rng, scheme):
  config = qlora_config(scheme)
  seed = int(rng.integers(1 << 30))
  model = registry.build(config, rngs=nnx.Rngs(seed))
  randomise_adapters(model, rng)
  fresh = registry.build(lora.float_config(config), rngs=nnx.Rngs(seed))
  float_state = dict(nnx.to_flat_state(nnx.state(fresh)))
  twin = float_twin(model, {p: np.asarray(float_state[p][...]) for p in
                            adapted_kernel_paths(config)})
  tokens = jnp.asarray(rng.integers(0, config.vocab_size, (2, 9)), jnp.int32)
  np.testing.assert_allclose(logits(model, tokens), logits(twin, tokens), atol=1e-5, rtol=0)
  # Not adapted: k_proj and the MLP's gate and up keep float kernels.
  assert isinstance(model.blocks[0].attention.k_proj.kernel, nnx.Param)
  assert isinstance(model.blocks[0].mlp.up.kernel, nnx.Param)
  np.testing.assert_allclose(logits(lora.merge(model), tokens), logits(lora.merge(twin), tokens),
                             atol=1e-5, rtol=0)
  # The base model's kernels: the stored codes and scales, de-quantised.
  base = dict(nnx.to_flat_state(nnx.state(lora.base_model(model))))
  state = dict(nnx.to_flat_state(nnx.state(model)))
  for path in adapted_kernel_paths(config):
    stored = [np.asarray(state[(*path, name)][...])
              for name in ('codes', 'scale_codes', 'group_scales', 'mean')]
    np.testing.assert_array_equal(
        np.asarray(base[path][...]),
        np_dequantize(*stored, scheme, config.lora_quantize_block, base[path].shape))


def test_only_the_adapters_train(rng):
  config = qlora_config('nf4')
  model = registry.build(config, rngs=nnx.Rngs(int(rng.integers(1 << 30))))
  assert registry.trainable(config) is nnx.LoRAParam
  assert registry.param_count(config) == registry.param_count(lora.float_config(config))
  graphdef, params = nnx.split(model)
  flat = dict(nnx.to_flat_state(params))
  quantized = {p: v for p, v in flat.items() if isinstance(v, quantize.QuantizedParam)}
  # Four Variables for each adapted kernel, in the model's state (what a checkpoint holds), none
  # a Param.
  assert len(quantized) == 4 * len(adapted_kernel_paths(config))
  assert not set(quantized) & set(dict(nnx.to_flat_state(nnx.state(model, nnx.Param))))
  opt_config = OptimizerConfig(learning_rate=1e-2, warmup_steps=1).resolved(10, 'decoder')
  optimizer = make_optimizer(opt_config)
  trained = trainable_part(params, nnx.LoRAParam)
  opt_state = optimizer.init(trained)
  # AdamW's two moments of each adapter, beside scalar step counts.
  lora_size = sum(v.size for v in jax.tree.leaves(nnx.state(model, nnx.LoRAParam)))
  assert sum(v.size for v in jax.tree.leaves(opt_state) if v.ndim) == 2 * lora_size
  before = {p: np.array(v[...], copy=True) for p, v in flat.items()}  # The step donates its input.
  step = make_train_step(graphdef, optimizer, schedule(opt_config), seed=0, use_dropout=False,
                         trainable=nnx.LoRAParam)
  tokens = jnp.asarray(rng.integers(0, config.vocab_size, (1, 2, 9)), jnp.int32)
  # The first update's learning rate is the warmup's 0.
  for i in range(2):
    params, opt_state, _ = step(params, opt_state, {'inputs': tokens, 'targets': tokens},
                                jnp.int32(i))
  after = dict(nnx.to_flat_state(params))
  for path in quantized:
    np.testing.assert_array_equal(np.asarray(after[path][...]), before[path])
  assert any(not np.array_equal(np.asarray(after[p][...]), before[p])
             for p, v in flat.items() if isinstance(v, nnx.LoRAParam))


@pytest.mark.parametrize('scheme', ['int8', 'nf4'])
def test_pretrained_parameters_load_quantised(rng, scheme):
  """As training/run.py init_from loads a pre-trained run into a QLoRA model: the kernels
  quantised into their QuantizedArrays, the rest copied by path."""
  config = qlora_config(scheme)
  pretrained = registry.build(without_peft(config), rngs=nnx.Rngs(int(rng.integers(1 << 30))))
  source = dict(nnx.to_flat_state(nnx.state(pretrained)))
  model = registry.build(config, rngs=nnx.Rngs(int(rng.integers(1 << 30))))
  randomise_adapters(model, rng)
  graphdef, params = nnx.split(model)

  copied = nnx.from_flat_state([(path, source[path] if path in source else value)
                                for path, value in nnx.to_flat_state(params)])
  loaded = nnx.merge(graphdef, quantize.filled_from(
      copied, {path: value[...] for path, value in source.items()}, scheme=scheme,
      block=config.lora_quantize_block))
  twin = float_twin(model, {p: np.asarray(source[p][...]) for p in adapted_kernel_paths(config)})
  nnx.update(twin, nnx.from_flat_state([(p, v) for p, v in source.items()
                                        if p not in adapted_kernel_paths(config)]))
  tokens = jnp.asarray(rng.integers(0, config.vocab_size, (2, 9)), jnp.int32)
  np.testing.assert_allclose(logits(loaded, tokens), logits(twin, tokens), atol=1e-5, rtol=0)
  assert not np.allclose(logits(loaded, tokens), logits(model, tokens), atol=1e-3)


@pytest.mark.parametrize('fields, field', [
    (dict(lora_quantize='nf3'), 'lora_quantize'),
    (dict(lora_quantize='nf4', lora_quantize_block=0), 'lora_quantize_block'),
    (dict(lora_quantize='nf4', lora_quantize_block=33), 'lora_quantize_block'),
    (dict(lora_quantize_block=32), 'lora_quantize_block'),
    (dict(peft='', lora_quantize='nf4'), 'lora_quantize'),
])
def test_bad_fields_are_config_errors(fields, field):
  with pytest.raises(ConfigError, match=f'^{field}='):
    small_config(**{'peft': 'lora', **fields})


# main.py --init_from a pre-trained run with these flags (test_main_finetune runs it).
QLORA_FLAGS = ['--peft=lora', '--lora_rank=2', '--lora_targets=q,down', '--lora_quantize=nf4']


def check_quantised_from(base: str, tuned: str):
  """The run `tuned`, started with QLORA_FLAGS from the run `base`, stores each adapted kernel
  as quantize.quantize of the pre-trained one, and the rest as the pre-trained model has it."""
  before = dict(nnx.to_flat_state(run_lib.restore(base).params))
  after = run_lib.restore(tuned)
  config = nnx.merge(after.graphdef, after.params).config
  stored = dict(nnx.to_flat_state(after.params))
  kernels = adapted_kernel_paths(config)
  for path in kernels:
    expected = quantize.quantize(before[path][...], 'nf4', config.lora_quantize_block)
    for name, value in zip(quantize.FIELDS, expected):
      np.testing.assert_array_equal(stored[(*path, name)][...], value, err_msg=str(path))
  for path, value in before.items():
    if path not in kernels:
      np.testing.assert_array_equal(stored[path][...], value[...], err_msg=str(path))
