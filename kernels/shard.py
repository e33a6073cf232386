"""Attention kernels that XLA cannot partition, run shard by shard on a mesh.

XLA's partitioner splits the plain and chunked implementations like any other jnp code, but
sees a Pallas or cuDNN kernel as one opaque call that it would run whole on every device;
such kernels run here shard by shard instead (jax.shard_map). Query heads are split as q's
PartitionSpec says; when the KV heads are whole on every device (fewer KV heads than the
devices along the query heads' axes), each shard slices out the KV heads of its query
heads' groups.
"""
import dataclasses
import math

import jax
import jax.numpy as jnp
from jax.sharding import Mesh, PartitionSpec


@dataclasses.dataclass(frozen=True)
class Partition:
  """How q [B, T, Hq, D] and k, v [B, S, Hkv, D] lie on `mesh`: their PartitionSpecs, four
  entries each, of which the batch and head entries are used."""
  mesh: Mesh
  q_spec: PartitionSpec
  kv_spec: PartitionSpec


def _head_axes_split(q_spec, kv_spec, n_heads, n_kv_heads, mesh):
  """(mesh axes over which query heads are split, KV heads each shard keeps, and whether
  those are a slice of whole-on-every-device KV heads)."""
  head_axes = q_spec[2]
  if head_axes is None or kv_spec[2] == head_axes:
    return head_axes, None, False
  axes = head_axes if isinstance(head_axes, tuple) else (head_axes,)
  local_heads, group = n_heads // math.prod(mesh.shape[a] for a in axes), n_heads // n_kv_heads
  if local_heads % group == 0:
    return head_axes, local_heads // group, True
  if group % local_heads == 0:
    return head_axes, 1, True
  return None, None, False


def per_shard(attend, q_bthd, k_bskd, v_bskd, partition: Partition, *, segment_ids,
              prefix_len, alibi_slopes, q_offset, **static):
  """attend(q, k, v, ...) (an implementation's signature) run by jax.shard_map over batch and
  heads; the arrays of the mask description are split along with q and k/v."""
  q_spec, kv_spec = partition.q_spec, partition.kv_spec
  batch_axes = q_spec[0] if kv_spec[0] == q_spec[0] else None
  head_axes, kv_per_shard, slice_kv = _head_axes_split(
      q_spec, kv_spec, q_bthd.shape[2], k_bskd.shape[2], partition.mesh)
  q_spec = PartitionSpec(batch_axes, None, head_axes, None)
  kv_spec = PartitionSpec(batch_axes, None, None if slice_kv else head_axes, None)
  arrays = dict(segment_ids=segment_ids, prefix_len=prefix_len, alibi_slopes=alibi_slopes,
                q_offset=q_offset)
  specs = dict(segment_ids=(PartitionSpec(batch_axes, None),) * 2,
               prefix_len=PartitionSpec(batch_axes), alibi_slopes=PartitionSpec(head_axes),
               q_offset=PartitionSpec(batch_axes) if jnp.ndim(q_offset) else PartitionSpec())
  given = {key: value for key, value in arrays.items()
           if value is not None and not isinstance(value, int)}
  fixed = {key: value for key, value in arrays.items() if key not in given}
  group = q_bthd.shape[2] // k_bskd.shape[2]

  def shard(q, k, v, shard_arrays):
    if slice_kv:
      first = jax.lax.axis_index(head_axes) * q.shape[2] // group
      k, v = (jax.lax.dynamic_slice_in_dim(x, first, kv_per_shard, axis=2) for x in (k, v))
    return attend(q, k, v, **shard_arrays, **fixed, **static)

  return jax.shard_map(shard, mesh=partition.mesh,
                       in_specs=(q_spec, kv_spec, kv_spec, {k: specs[k] for k in given}),
                       out_specs=q_spec, check_vma=False)(q_bthd, k_bskd, v_bskd, given)
