"""The Pallas kernels (GPU and TPU variants, in interpret mode) against impl='xla'.

Shapes, offsets and masks are drawn per run; blocks are 16 so that every problem spans
several blocks and ends in a partial one. Every kernel output starts poisoned with NaN,
so a block that a kernel forgets to write fails the comparison.
"""
import contextlib
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx
from jax.experimental import pallas as pl

from lmlab.kernels import attention as attention_lib
from conftest import ROOT, small_config
from lmlab.kernels import cudnn, masks, pallas, pallas_common, pallas_gpu, pallas_tpu, reference
from lmlab.models.decoder import DecoderLM
from lmlab.training import steps as steps_lib

BLOCK = 16
HQ = 4


@pytest.fixture(autouse=True)
def float32_matmuls():
  """On a GPU the oracle's float32 products would otherwise run in TF32."""
  with jax.default_matmul_precision('highest'):
    yield

# Every mask kind (each alone or with ALiBi, drawn per run), then combinations with ALiBi.
MASK_KINDS = [dict(causal=False), dict(causal=True), dict(causal=True, window=True),
              dict(causal=True, prefix=True), dict(causal=True, segments=True),
              dict(causal=False, segments=True)]
CASES = MASK_KINDS + [dict(causal=False, window=True, prefix=True, alibi=True),
                      dict(causal=True, window=True, prefix=True, segments=True, alibi=True)]


def case_id(case):
  return '-'.join(['causal' if case['causal'] else 'full']
                  + [name for name in ('window', 'prefix', 'segments', 'alibi') if case.get(name)])


def not_block_multiple(n):
  return n + 1 if n % BLOCK == 0 else n


def random_problem(case, hkv, rng, dtype=np.float32):
  """q, k, v and attention_lib.attention's mask arguments; T and S are not multiples of BLOCK."""
  b, d = 2, int(rng.choice([8, 12, 16]))
  t = not_block_multiple(int(rng.integers(1, 40)))
  s = not_block_multiple(int(rng.integers(1, 56)))
  q_offset = rng.integers(0, s + 4, (b,)) if rng.random() < 0.5 else int(rng.integers(0, s + 4))
  q = rng.standard_normal((b, t, HQ, d)).astype(dtype)
  k = rng.standard_normal((b, s, hkv, d)).astype(dtype)
  v = rng.standard_normal((b, s, hkv, d)).astype(dtype)
  mask = dict(causal=case['causal'], sliding_window=None, segment_ids=None, prefix_len=None,
              alibi_slopes=None, scale=float(rng.uniform(0.1, 1.0)), q_offset=q_offset)
  if case.get('window'):
    mask['sliding_window'] = int(rng.integers(1, 12))
  if case.get('prefix'):
    mask['prefix_len'] = rng.integers(0, s + 1, (b,))
  if case.get('segments'):
    mask['segment_ids'] = (np.sort(rng.integers(0, 3, (b, t)), axis=1),
                           np.sort(rng.integers(0, 3, (b, s)), axis=1))
  if case.get('alibi'):
    mask['alibi_slopes'] = rng.uniform(0.01, 1.0, (HQ,)).astype(np.float32)
  return q, k, v, mask


def output_and_grads(attend, q, k, v, d_out):
  """(output, (dq, dk, dv)) of sum(attend(q, k, v) * d_out), all in float32."""
  out, pullback = jax.vjp(attend, q, k, v)
  grads = pullback(d_out.astype(out.dtype))
  return out.astype(jnp.float32), [g.astype(jnp.float32) for g in grads]


def compare(q, k, v, mask, rng, *, variant, rtol=1e-5, grad_rtol=1e-4):
  d_out = jnp.asarray(rng.standard_normal(q.shape), jnp.float32)
  qkv = [jnp.asarray(x) for x in (q, k, v)]
  run = jax.jit(lambda q, k, v: output_and_grads(
      lambda q, k, v: pallas.attention(q, k, v, **mask, blocks=BLOCK, variant=variant,
                                       poison=True), q, k, v, d_out))
  got_out, got_grads = jax.tree.map(np.asarray, run(*qkv))
  # The oracle sees the same (possibly rounded) inputs, in float32.
  qkv32 = [x.astype(jnp.float32) for x in qkv]
  oracle = jax.jit(lambda q, k, v: output_and_grads(
      lambda q, k, v: reference.attention(q, k, v, **mask), q, k, v, d_out))
  expected_out, expected_grads = jax.tree.map(np.asarray, oracle(*qkv32))
  # Relative to the largest magnitude: outputs that cancel to near zero keep absolute error.
  for name, got, expected, tolerance in [('out', got_out, expected_out, rtol)] + [
      (f'd{name}', g, e, grad_rtol) for name, g, e in zip('qkv', got_grads, expected_grads)]:
    scale = np.max(np.abs(expected), initial=1.0)
    np.testing.assert_allclose(got, expected, rtol=tolerance, atol=tolerance * scale,
                               err_msg=name)


@pytest.mark.parametrize('case', CASES, ids=case_id)
def test_gpu_kernels_match_xla(case, rng):
  """A mask kind alone or with ALiBi, half the runs each (one compilation per test, not two)."""
  hkv = [1, 2, HQ][CASES.index(case) % 3]
  if case in MASK_KINDS:
    case = dict(case, alibi=bool(rng.integers(2)))
    print(f'alibi={case["alibi"]}')
  compare(*random_problem(case, hkv, rng), rng, variant='gpu')


@pytest.mark.parametrize('case', [
    dict(causal=True, window=True, prefix=True, segments=True, alibi=True),
    dict(causal=False, window=True, segments=True, alibi=True)], ids=case_id)
def test_tpu_kernels_match_xla(case, rng):
  hkv = int(rng.choice([1, 2, HQ]))
  compare(*random_problem(case, hkv, rng), rng, variant='tpu')


@pytest.mark.parametrize('dtype', [jnp.bfloat16, jnp.float16])
def test_half_precision_within_2e_2(dtype, rng):
  case = dict(causal=True, window=True, segments=True, alibi=True)
  q, k, v, mask = random_problem(case, int(rng.choice([1, 2])), rng, dtype)
  compare(q, k, v, mask, rng, variant='gpu', rtol=2e-2, grad_rtol=2e-2)


def test_rows_without_visible_keys_are_zero_with_zero_gradients(rng):
  b, t, s, d = 2, 20, 20, 8
  q = jnp.asarray(rng.standard_normal((b, t, HQ, d)), jnp.float32)
  k = jnp.asarray(rng.standard_normal((b, s, 2, d)), jnp.float32)
  q_seg = jnp.asarray(np.repeat([[0] * 10 + [1] * 5 + [2] * 5], b, 0))
  kv_seg = jnp.asarray(np.repeat([[0] * 10 + [1] * 10], b, 0))  # Segment 2 has no keys.
  mask = dict(causal=True, sliding_window=None, segment_ids=(q_seg, kv_seg), prefix_len=None,
              alibi_slopes=None, scale=0.5, q_offset=0)
  expected = reference.attention(q, k, k, **mask)
  for variant in ('gpu', 'tpu'):
    attend = lambda q, k: pallas.attention(q, k, k, **mask, blocks=BLOCK, variant=variant,
                                           poison=True)

    def output_and_grads_of_sum(q, k):
      out, pullback = jax.vjp(attend, q, k)
      return out, pullback(jnp.ones_like(out))

    out, (dq, dk) = jax.tree.map(np.asarray, jax.jit(output_and_grads_of_sum)(q, k))
    assert np.all(out[:, 15:] == 0.0) and np.all(dq[:, 15:] == 0.0)
    assert np.all(np.isfinite(dq)) and np.all(np.isfinite(dk))
    np.testing.assert_allclose(out, expected, rtol=1e-5, atol=1e-5)


def test_poison_exposes_an_unwritten_block():
  def kernel(*, x, y):
    @pl.when(pl.program_id(0) == 0)
    def _():
      y[...] = x[...]

  spec = pl.BlockSpec((BLOCK,), lambda i: (i,))
  settings = pallas_common.Settings(False, None, 1.0, pallas_common.BlockSizes.uniform(BLOCK),
                                    'gpu', True, poison=True)
  [y] = pallas_common.call(kernel, grid=(2,), inputs=dict(x=(jnp.ones(2 * BLOCK), spec)),
                           outputs=dict(y=(jax.ShapeDtypeStruct((2 * BLOCK,), jnp.float32), spec)),
                           settings=settings, name='half_written', interpret=True)
  assert np.all(np.asarray(y[:BLOCK]) == 1.0) and np.all(np.isnan(np.asarray(y[BLOCK:])))


@pytest.mark.parametrize('case', MASK_KINDS, ids=case_id)
def test_block_ranges_are_exactly_the_blocks_with_a_visible_key(case, rng):
  """Hidden blocks are skipped and no visible one is: ranges are the tight hull."""
  q, k, _, mask = random_problem(dict(case, segments=False), 1, rng)
  b, t, s = q.shape[0], q.shape[1], k.shape[1]
  block_q, block_k = (int(x) for x in rng.choice([4, 8, 16], 2))
  settings = pallas_common.Settings(mask['causal'], mask['sliding_window'], 1.0,
                                    pallas_common.BlockSizes.uniform(1), 'gpu', True, False)
  t_pad, s_pad = -(-t // block_q) * block_q, -(-s // block_k) * block_k
  arrays = {name: mask[name] for name in ('segment_ids', 'prefix_len', 'alibi_slopes',
                                          'q_offset')}

  @jax.jit
  def block_ranges(arrays):
    vectors = pallas_common.Mask(arrays, settings, b=b, t=t, s=s, t_pad=t_pad, s_pad=s_pad)
    return vectors.key_blocks(block_q, block_k), vectors.query_blocks(block_q, block_k)

  q_pos = np.asarray(mask['q_offset']).reshape(-1, 1) + np.arange(t)
  visible = np.asarray(masks.visible(
      q_pos, np.arange(s), causal=mask['causal'], sliding_window=mask['sliding_window'],
      prefix_len=mask['prefix_len']))
  visible = np.broadcast_to(visible, (b, t, s))
  padded = np.zeros((b, t_pad, s_pad), bool)
  padded[:, :t, :s] = visible
  blocks = padded.reshape(b, t_pad // block_q, block_q, s_pad // block_k, block_k).any((2, 4))

  def hull(row):
    seen = np.flatnonzero(row)
    return (seen[0], seen[-1] + 1) if seen.size else None

  key_ranges, query_ranges = block_ranges(arrays)
  for ranges, block_rows in ((key_ranges, blocks), (query_ranges, blocks.swapaxes(1, 2))):
    first, last = map(np.asarray, ranges)
    for bi in range(b):
      for i, row in enumerate(block_rows[bi]):
        expected = hull(row)
        if expected is None:
          assert first[bi, i] == last[bi, i]
        else:
          assert (first[bi, i], last[bi, i]) == expected


@pytest.mark.parametrize('variant,platform', [('gpu', 'cuda'), ('tpu', 'tpu')])
def test_kernels_lower_for_the_accelerator(variant, platform):
  """The Triton and Mosaic lowerings accept every kernel (checked here without a device)."""
  b, t, s, hkv, d = 2, 300, 333, 2, 72
  q = jax.ShapeDtypeStruct((b, t, HQ, d), jnp.bfloat16)
  k = jax.ShapeDtypeStruct((b, s, hkv, d), jnp.bfloat16)
  segments = (jnp.zeros((b, t), jnp.int32), jnp.zeros((b, s), jnp.int32))
  mask = dict(causal=True, sliding_window=64, segment_ids=segments, prefix_len=jnp.array([3, 9]),
              alibi_slopes=jnp.ones(HQ), scale=0.1, q_offset=jnp.array([33, 0]))

  def loss(q, k, v):
    return pallas.attention(q, k, v, **mask, variant=variant, interpret=False).sum()

  step = jax.jit(jax.value_and_grad(loss, (0, 1, 2)))
  with pallas_gpu.lowering_target() if platform == 'cuda' else contextlib.nullcontext():
    text = step.trace(q, k, k).lower(lowering_platforms=(platform,)).as_text()
  target = '__gpu$xla.gpu.triton' if variant == 'gpu' else 'tpu_custom_call'
  assert text.count(f'custom_call @{target}') == 3  # forward, dQ, dK/dV


def test_model_trained_with_pallas_matches_xla(rng):
  fields = dict(position='alibi', sliding_window=6, n_kv_heads=2, n_layers=1)
  seed = int(rng.integers(1 << 30))
  tokens = jnp.asarray(rng.integers(0, 61, (1, 2, 13)), jnp.int32)
  segments = jnp.asarray(np.sort(rng.integers(0, 2, (1, 2, 12)), axis=-1))
  batch = dict(inputs=tokens[..., :-1], targets=tokens[..., 1:], segment_ids=segments)
  runs = []
  for impl in ('pallas', 'xla'):
    config = small_config(attention_impl=impl, **fields)
    graphdef, params = nnx.split(DecoderLM(config, rngs=nnx.Rngs(seed)))
    # Plain SGD: Adam would turn rounding-level gradient differences into lr-sized steps.
    optimizer = optax.sgd(0.5)
    opt_state = optimizer.init(params)
    step = steps_lib.make_train_step(graphdef, optimizer, lambda s: 0.5, seed=0,
                                     use_dropout=False)
    losses = []
    for i in range(3):
      params, opt_state, metrics = step(params, opt_state, batch, jnp.int32(i))
      losses.append(float(metrics['loss']))
    runs.append((losses, params))
  (pallas_losses, pallas_params), (xla_losses, xla_params) = runs
  np.testing.assert_allclose(pallas_losses, xla_losses, rtol=1e-5)
  for got, expected in zip(jax.tree.leaves(pallas_params), jax.tree.leaves(xla_params)):
    np.testing.assert_allclose(np.asarray(got), np.asarray(expected), rtol=1e-4, atol=1e-5)


def test_impl_pallas_through_kernels_attention(rng):
  q = jnp.asarray(rng.standard_normal((1, 5, 2, 8)), jnp.float32)
  got = attention_lib.attention(q, q, q, causal=True, impl='pallas')
  want = attention_lib.attention(q, q, q, causal=True, impl='xla')
  np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-5, atol=1e-6)
  if jax.default_backend() == 'cpu':
    assert attention_lib.auto_implementation(q, q) == 'chunked'  # CPU keeps the blockwise kernel.
  else:
    assert attention_lib.auto_implementation(q, q) == 'pallas'


def test_auto_probe_accepts_the_kernels_and_refuses_wrong_or_failing_ones(monkeypatch):
  """pallas.runs_here, which impl='auto' trusts off CPU, run here in interpret mode."""
  lengths, kernels_under_test = [], pallas.attention

  def real(q, k, v, **mask):
    lengths.append((q.shape[1], k.shape[1]))
    return kernels_under_test(q, k, v, **mask)

  def off_by_one_percent(q, k, v, **mask):
    return reference.attention(q, k, v, **{**mask, 'scale': mask['scale'] * 1.01})

  def failing(q, k, v, **mask):
    raise RuntimeError('out of resource: shared memory')

  try:
    for kernel, runs in ((real, True), (off_by_one_percent, False), (failing, False)):
      pallas.runs_here.cache_clear()
      monkeypatch.setattr(pallas, 'attention', kernel)
      assert pallas.runs_here(jnp.float32, 8) is runs, kernel
  finally:
    pallas.runs_here.cache_clear()
  # The probe's blocks are those of a long run, so its shared memory is too.
  t, s = lengths[0]
  for variant in (pallas_gpu, pallas_tpu):
    for head_dim in (64, 128, 256):
      blocks = variant.default_blocks(head_dim)
      assert blocks.fitted(t, s, variant.MIN_BLOCK) == blocks


def test_pallas_rejects_what_it_cannot_run():
  q = jnp.zeros((1, 4, 2, 8), jnp.int32)
  with pytest.raises(ValueError, match='dtypes'):
    attention_lib.attention(q, q, q, impl='pallas')
  q = jnp.zeros((1, 4, 2, 512))
  with pytest.raises(ValueError, match='head_dim 512'):
    attention_lib.attention(q, q, q, impl='pallas')


@pytest.mark.parametrize('mask,reason', [
    (dict(segment_ids=(jnp.zeros((1, 4), int), jnp.zeros((1, 4), int))), 'segment ids'),
    (dict(prefix_len=jnp.array([2])), 'prefix'), (dict(alibi_slopes=jnp.ones(2)), 'ALiBi'),
    (dict(causal=True, q_offset=3), 'q_offset'), (dict(sliding_window=2), 'causal'),
    (dict(causal=True), 'dtype float32')])
def test_cudnn_says_what_it_does_not_support(mask, reason):
  q = jnp.zeros((1, 4, 2, 8))
  with pytest.raises(ValueError, match=reason):
    attention_lib.attention(q, q, q, impl='cudnn', **mask)
  if jax.default_backend() != 'gpu':
    with pytest.raises(ValueError, match='CUDA GPU'):
      cudnn.attention(q.astype(jnp.bfloat16), q.astype(jnp.bfloat16), q.astype(jnp.bfloat16),
                      causal=True, sliding_window=None, segment_ids=None, prefix_len=None,
                      alibi_slopes=None, scale=1.0, q_offset=0)


@pytest.mark.skipif(jax.default_backend() != 'gpu', reason='cuDNN needs a CUDA GPU')
def test_cudnn_matches_xla(rng):
  q, k, v, mask = random_problem(dict(causal=True, window=True), 2, rng, jnp.bfloat16)
  q, k, v = (jnp.asarray(np.pad(x, ((0, 0),) * 3 + ((0, 16 - x.shape[3]),))) for x in (q, k, v))
  q, mask['q_offset'] = q[:, :k.shape[1]], 0  # Every row then sees at least its own key.
  got = attention_lib.attention(q, k, v, impl='cudnn', **mask).astype(jnp.float32)
  expected = reference.attention(*(x.astype(jnp.float32) for x in (q, k, v)), **mask)
  np.testing.assert_allclose(np.asarray(got), np.asarray(expected), rtol=2e-2, atol=2e-2)


def test_benchmark_runs_on_cpu():
  result = subprocess.run(
      [sys.executable, '-m', 'lmlab.kernels.benchmark', '--impls=xla,cudnn', '--seq_lens=32',
       '--tokens=32', '--heads=2', '--head_dim=8', '--causal=true', '--reps=2', '--warmup=1'],
      cwd=ROOT, capture_output=True, text=True, timeout=300,
      env=dict(os.environ, JAX_PLATFORMS='cpu'))
  assert result.returncode == 0, result.stderr
  rows = [line for line in result.stdout.splitlines() if line.startswith('| ')]
  assert [row.split(' | ')[0] for row in rows[1:]] == ['| xla', '| cudnn']
  assert 'TFLOP/s' in rows[0] and 'n/a' in rows[2]
