"""On 8 CPU devices: kernels.attention with a partition runs the kernels XLA cannot partition
shard by shard and leaves the others to XLA, equal to the reference on unsharded inputs.

Runs in its own process through tests/test_sharding.py (JAX must be started with 8 devices).
"""
import jax
import numpy as np
import pytest
from jax.sharding import AxisType, NamedSharding, PartitionSpec

from lmlab.kernels import attention as attention_lib
from lmlab.kernels.shard import Partition

B, T, HQ, D = 4, 9, 8, 8


@pytest.fixture(autouse=True, scope='module')
def eight_devices():
  assert jax.device_count() == 8, 'start JAX with --xla_force_host_platform_device_count=8'


@pytest.mark.parametrize('impl, n_kv_heads, kv_head_axis, devices, per_shard', [
    ('pallas', HQ, 'tensor', 8, True),  # KV heads split like the query heads.
    ('pallas', 2, None, 8, True),  # KV heads whole on every device: each shard slices 1.
    ('pallas', 4, None, 8, True),  # Two query heads a shard, one group: slices 1 of 4.
    ('pallas', 2, None, 1, False),  # One device: nothing to split.
    ('xla', 2, None, 8, False),
    ('chunked', HQ, 'tensor', 8, False),
])
def test_only_kernels_xla_cannot_partition_run_per_shard(rng, impl, n_kv_heads, kv_head_axis,
                                                         devices, per_shard):
  mesh = jax.make_mesh((2, devices // 2) if devices > 1 else (1, 1), ('data', 'tensor'),
                       axis_types=(AxisType.Auto,) * 2, devices=jax.devices()[:devices])
  partition = Partition(mesh, PartitionSpec('data', None, 'tensor', None),
                        PartitionSpec('data', None, kv_head_axis, None))
  q_bthd = rng.standard_normal((B, T, HQ, D)).astype(np.float32)
  k_bshd, v_bshd = rng.standard_normal((2, B, T, n_kv_heads, D)).astype(np.float32)
  segments_bt = np.sort(rng.integers(0, 2, (B, T)), axis=1).astype(np.int32)
  arrays = dict(segment_ids=(segments_bt, segments_bt),
                alibi_slopes=rng.uniform(0.1, 1.0, HQ).astype(np.float32),
                q_offset=rng.integers(0, 3, B).astype(np.int32))
  expected = attention_lib.attention(q_bthd, k_bshd, v_bshd, causal=True, **arrays, impl='xla')

  def place(x, spec):
    return jax.device_put(x, NamedSharding(mesh, spec))

  inputs = (place(q_bthd, partition.q_spec), place(k_bshd, partition.kv_spec),
            place(v_bshd, partition.kv_spec), arrays)
  run = jax.jit(lambda q, k, v, arrays: attention_lib.attention(
      q, k, v, causal=True, **arrays, impl=impl, partition=partition))
  np.testing.assert_allclose(np.asarray(run(*inputs)), np.asarray(expected),
                             rtol=1e-5, atol=1e-5)
  assert ('manual' in run.lower(*inputs).as_text().lower()) is per_shard
