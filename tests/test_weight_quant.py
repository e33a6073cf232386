"""Weight-only quantisation (models/weight_quant.py): codes, scales and de-quantised kernels
against a numpy implementation of the formulas, the straight-through estimator's gradient,
a quantised or QAT model against a float model holding the numpy-rounded kernels, and main.py's
--quantize / --qat end to end with its bad input, and --draft (speculative decoding) with the
quantised model drafting for the float one, --num_samples and --kv_cache_dtype."""
import dataclasses
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from conftest import jit_call, small_config
from lmlab.models import registry, weight_quant
from lmlab.models.errors import ConfigError
from lmlab.training import loop
from lmlab.training import run as run_lib
from lmlab.training.config import TrainConfig
from lmlab.training.optimizer import OptimizerConfig
from lmlab.training.restored import restore
from lmlab.training.workdir import WorkdirError
from test_main import SMALL, run_main, run_mains

F32 = np.float32
SPECS = ['int8', 'int8:asym', 'int8:g16', 'int4:g8', 'int4:g16:asym', 'int4:asym']
# What the module docstring says quantisation covers, by path: each block's projections and
# MLP, and the untied LM head.
COVERED = ('q_proj', 'k_proj', 'v_proj', 'o_proj', 'gate', 'up', 'down')


def np_quantize(w, bits, group, asymmetric):
  """(codes [D_in, D_out], values [D_in, D_out]) by the docstring's formulas, one group of
  rows at a time, float32 throughout."""
  w = np.asarray(w, F32)
  codes, values = np.zeros(w.shape, np.int64), np.zeros(w.shape, F32)
  group = group or w.shape[0]
  top = 2 ** bits - 1
  for start in range(0, w.shape[0], group):
    rows = w[start:start + group]
    low, high = np.minimum(rows.min(0), F32(0)), np.maximum(rows.max(0), F32(0))
    if asymmetric:
      scale = (high - low) * F32(1 / top)
    else:
      scale = np.maximum(high, -low) * F32(1 / (2 ** (bits - 1) - 1))
    scale = np.where(scale == 0, F32(1), scale)
    inverse = F32(1) / scale
    zero = (np.clip(np.round(-low * inverse), 0, top) if asymmetric
            else np.full_like(scale, 2 ** (bits - 1)))
    code = np.clip(np.round(rows * inverse) + zero, 0, top)
    codes[start:start + group] = code
    values[start:start + group] = (code - zero) * scale
  return codes, values


def random_kernel(rng, d_in, d_out):
  w = rng.standard_normal((d_in, d_out)).astype(F32) * F32(rng.uniform(0.01, 2))
  w[:, rng.integers(d_out)] = 0  # an all-zero column
  w[rng.integers(d_in), rng.integers(d_out)] *= 20  # an outlier
  return w


@pytest.mark.parametrize('spec', SPECS)
def test_codes_and_values_match_numpy(spec, rng):
  parsed = weight_quant.parse_spec(spec, 'quantize')
  w = random_kernel(rng, 32, int(rng.integers(3, 9)))
  kernel = weight_quant.QuantizedKernel(nnx.Param(jnp.asarray(w)), parsed)
  codes, values = np_quantize(w, parsed.bits, parsed.group, parsed.asymmetric)
  np.testing.assert_array_equal(np.asarray(kernel[...]), values)
  stored = np.asarray(kernel.codes[...])
  assert stored.dtype == np.uint8
  if parsed.bits == 4:
    np.testing.assert_array_equal(stored, codes[0::2] * 16 + codes[1::2])
  else:
    np.testing.assert_array_equal(stored, codes)
  # Rounding to the nearest level: within half a level of w inside the range.
  group = parsed.group or 32
  level = np.abs(np.diff(np.sort(np.unique(values[:group, 0])))).min(initial=np.inf)
  if np.isfinite(level) and not parsed.asymmetric:
    assert np.abs(values[:group, 0] - w[:group, 0]).max() <= level / 2 * (1 + 1e-6)


def test_fake_quantize_is_straight_through(rng):
  parsed = weight_quant.parse_spec('int4:g8:asym', 'qat')
  w, upstream = random_kernel(rng, 16, 5), rng.standard_normal((16, 5)).astype(F32)
  value, grad = jax.value_and_grad(
      lambda w: jnp.sum(parsed.fake_quantize(w) * upstream))(jnp.asarray(w))
  _, values = np_quantize(w, 4, 8, True)
  np.testing.assert_allclose(value, np.sum(values * upstream), rtol=1e-5)
  np.testing.assert_array_equal(np.asarray(grad), upstream)


def rounded_float_model(model, spec):
  """A float copy of `model` whose covered kernels hold np_quantize's values."""
  parsed = weight_quant.parse_spec(spec, 'quantize')
  graphdef, state = nnx.split(model)
  flat = dict(nnx.to_flat_state(state))
  for path, variable in flat.items():
    covered = path[-1] == 'kernel' and (path[0] == 'lm_head' or path[-2] in COVERED)
    if covered:
      flat[path] = variable.replace(jnp.asarray(np_quantize(
          variable.get_value(), parsed.bits, parsed.group, parsed.asymmetric)[1]))
  return nnx.merge(graphdef, nnx.from_flat_state(list(flat.items())))


def tokens(rng, config, shape=(2, 12)):
  return jnp.asarray(rng.integers(0, config.vocab_size, shape), jnp.int32)


@pytest.mark.parametrize('spec', ['int8', 'int4:g16:asym'])
def test_quantized_model_is_the_rounded_float_model(spec, rng):
  config = small_config(mlp=rng.choice(['swiglu', 'gelu']).item())
  model = registry.build(config, rngs=nnx.Rngs(int(rng.integers(1 << 30))))
  expected = rounded_float_model(model, spec)
  graphdef, state = nnx.split(model)
  quantized = weight_quant.quantize_kernels(nnx.merge(graphdef, state), weight_quant.parse_spec(
      spec, 'quantize'))
  x_bt = tokens(rng, config)
  np.testing.assert_allclose(jit_call(quantized)(x_bt), jit_call(expected)(x_bt), atol=2e-5,
                             rtol=2e-5)
  # Built from a config that says so, the model holds integer codes instead of the kernels.
  built = registry.build(dataclasses.replace(config, quantize=spec).validate(),
                         rngs=nnx.Rngs(0))
  kinds = {type(v).__name__ for p, v in nnx.to_flat_state(nnx.state(built)) if 'kernel' in p}
  assert kinds == {'QuantizedParam'}


def test_qat_forward_and_gradient_are_the_rounded_model(rng):
  spec = 'int4:g8'
  config = small_config(qat=spec)
  model = registry.build(config, rngs=nnx.Rngs(int(rng.integers(1 << 30))))
  expected = rounded_float_model(model, spec)
  x_bt, y_bt = tokens(rng, config), tokens(rng, config)

  def loss(model):
    logits = model(x_bt)
    return -jnp.mean(jnp.take_along_axis(jax.nn.log_softmax(logits), y_bt[..., None], -1))

  qat_loss, qat_grads = nnx.jit(nnx.value_and_grad(loss))(model)
  float_loss, float_grads = nnx.jit(nnx.value_and_grad(loss))(expected)
  np.testing.assert_allclose(qat_loss, float_loss, rtol=1e-5)
  # The straight-through estimator: the gradient at the rounded kernels, for the latent ones.
  for (path, got), (_, want) in zip(nnx.to_flat_state(qat_grads),
                                    nnx.to_flat_state(float_grads)):
    np.testing.assert_allclose(got.get_value(), want.get_value(), atol=1e-5, rtol=1e-4,
                               err_msg=str(path))


def test_bad_specs():
  for spec in ['int3', 'int4:g0', 'fp8', 'int4:asym:g32', 'int8:g']:
    with pytest.raises(ConfigError, match='not a quantisation spec'):
      small_config(quantize=spec)
  with pytest.raises(ConfigError, match='group size 12 does not divide the input dimension 32'):
    registry.build(small_config(qat='int4:g12'), rngs=nnx.Rngs(0))
  with pytest.raises(ConfigError, match='without PEFT'):
    small_config(quantize='int8', peft='lora')


def eval_loss(result) -> float:
  return float(result.stdout.split(': loss ')[1].split(',')[0])


def test_main_quantize_convert_and_qat(tmp_path, corpus_dir):
  float_run, qat_run = str(tmp_path / 'float'), str(tmp_path / 'qat')
  bpe_run = str(tmp_path / 'bpe')
  common = [*SMALL, f'--data={corpus_dir}', '--steps=20', '--learning_rate=1e-2']
  run_mains([*common, f'--workdir={float_run}'],
            [*common, f'--workdir={qat_run}', '--qat=int4:g16'],
            [*common, f'--workdir={bpe_run}', '--tokenizer=bpe:280', '--steps=2'])
  q8 = str(tmp_path / 'q8')
  evaluated, converted, qat_eval, qat_float = run_mains(
      ['--mode=eval', f'--workdir={float_run}', '--quantize=int8'],
      ['--mode=convert', f'--workdir={float_run}', '--quantize=int8',
       f'--quantized_workdir={q8}'],
      ['--mode=eval', f'--workdir={qat_run}', '--quantize=int4:g16'],
      ['--mode=eval', f'--workdir={qat_run}'], check=False)
  assert evaluated.returncode == 0 and converted.returncode == 0, evaluated.stderr[-2000:]
  # A QAT run evaluates as its fake-quantised self; quantised, it computes the same.
  assert qat_eval.returncode == 0, qat_eval.stderr[-2000:]
  assert eval_loss(qat_float) == pytest.approx(eval_loss(qat_eval), abs=2e-4)
  # The converted workdir holds integer codes, and evaluates as --quantize did.
  loaded = restore(q8)
  codes = [v for p, v in nnx.to_flat_state(loaded.params) if p[-1] == 'codes']
  assert codes and all(v.get_value().dtype == np.uint8 for v in codes)
  again = run_main('--mode=eval', f'--workdir={q8}')
  assert eval_loss(again) == eval_loss(evaluated)
  # The quantised run drafts for the float one: greedy decoding is the float run's own.
  greedy = ['--mode=generate', f'--workdir={float_run}', '--prompt=alpha', '--temperature=0',
            '--max_new_tokens=24']
  plain, speculative, other_vocabulary, shared, drafted_samples, int8_cache = run_mains(
      greedy, [*greedy, f'--draft={q8}', '--draft_tokens=3'],
      [*greedy, f'--draft={bpe_run}'], [*greedy, '--num_samples=3'],
      [*greedy, f'--draft={q8}', '--num_samples=2'],
      [*greedy, '--num_samples=2', '--kv_cache_dtype=int8'], check=False)
  assert plain.returncode == 0 and speculative.stdout == plain.stdout, speculative.stderr[-2000:]
  # Greedy samples over one shared prompt cache are each the plain greedy text.
  assert shared.returncode == 0, shared.stderr[-2000:]
  assert shared.stdout == ''.join(f'--- sample {i} of 3 ---\n{plain.stdout}' for i in (1, 2, 3))
  assert drafted_samples.returncode == 1 and 'leave out --num_samples' in drafted_samples.stderr
  # An int8 KV cache decodes (its values are tested in test_kv_cache.py).
  assert int8_cache.returncode == 0, int8_cache.stderr[-2000:]
  assert int8_cache.stdout.startswith('--- sample 1 of 2 ---\nalpha')
  assert 'drafted tokens accepted' in speculative.stderr
  assert other_vocabulary.returncode == 1
  assert 'another tokenizer or vocabulary' in other_vocabulary.stderr
  # What cannot be done is refused before anything is written.
  float_loaded = restore(float_run)
  for spec, message in [('int5', "--quantize='int5' is not a quantisation spec"),
                        ('int4:g24', 'group size 24 does not divide')]:
    with pytest.raises(ConfigError, match=message):
      run_lib.with_quantized_weights(float_loaded, spec)
  with pytest.raises(ConfigError, match='frozen integer kernels'):
    loop.train(TrainConfig(workdir=str(tmp_path / 't')), small_config(quantize='int8'),
               OptimizerConfig())
  with pytest.raises(WorkdirError, match='already holds a run'):
    run_lib.write_quantized(run_lib.with_quantized_weights(float_loaded, 'int8'), q8)
  with pytest.raises(ConfigError, match='holds quantised kernels'):
    run_lib.workdir_to_hf(q8, str(tmp_path / 'hf'))
  assert not os.path.exists(tmp_path / 'hf') and not os.path.exists(tmp_path / 't')
