"""The device mesh of a run and how its state and batches are laid out on it.

`--mesh=data:2,fsdp:2,tensor:2` names the sizes of the four mesh axes (-1: the devices
left over; an axis not named has size 1); `expert` splits a mixture of experts' experts
(`--mesh=data:2,expert:4`). Parameters and optimizer moments are placed by their logical
axis names through the rules of models/sharding.py (`--logical_rules` changes them); each
step's batch is split over the batch rule's axes, (data, fsdp, expert) by default.

Several processes (hosts, or one per GPU) form one run through JAX's own distributed runtime:
`initialize_distributed` calls jax.distributed.initialize, and from then on jax.devices()
is every process's devices and the mesh spans them all. Each process builds a step's batch
from the same (seed, step) and hands JAX only the rows its own devices hold.
"""
import collections
import dataclasses
import math

import jax
import numpy as np
from jax.sharding import AxisType, NamedSharding, PartitionSpec

from lmlab.models.errors import ConfigError
from lmlab.models import sharding

MESH_AXES = ('data', 'fsdp', 'expert', 'tensor')


def mesh_shape(text: str, n_devices: int) -> dict:
  """{'data': ..., 'fsdp': ..., 'expert': ..., 'tensor': ...} from 'data:2,fsdp:-1'; the
  sizes multiply to n_devices."""
  sizes, rest, named = dict.fromkeys(MESH_AXES, 1), None, set()
  for item in filter(None, (part.strip() for part in text.split(','))):
    name, sep, size = item.partition(':')
    if name in named:
      raise ConfigError(f'--mesh={text} names {name} twice')
    named.add(name)
    if not sep or name not in MESH_AXES or not size.lstrip('-').isdigit():
      raise ConfigError(f'--mesh entry {item!r} is not <axis>:<size> with the axis one of '
                        f'{", ".join(MESH_AXES)} (e.g. --mesh=data:2,fsdp:-1)')
    sizes[name] = int(size)
    if sizes[name] == -1:
      if rest is not None:
        raise ConfigError(f'--mesh={text} has more than one axis of size -1')
      rest = name
    elif sizes[name] <= 0:
      raise ConfigError(f'--mesh={text}: sizes are positive, or -1 for the rest')
  fixed = math.prod(size for name, size in sizes.items() if name != rest)
  if rest is not None:
    if n_devices % fixed:
      raise ConfigError(f'--mesh={text}: {n_devices} devices do not divide into axes of '
                        f'{fixed} devices')
    sizes[rest] = n_devices // fixed
  if math.prod(sizes.values()) != n_devices:
    raise ConfigError(f'--mesh={text} has {math.prod(sizes.values())} devices, but this run '
                      f'has {n_devices}; make the sizes multiply to {n_devices} or use -1')
  return sizes


def make_mesh(text: str, devices=None) -> jax.sharding.Mesh:
  devices = jax.devices() if devices is None else devices
  sizes = mesh_shape(text, len(devices))
  return jax.make_mesh(tuple(sizes[a] for a in MESH_AXES), MESH_AXES,
                       axis_types=(AxisType.Auto,) * len(MESH_AXES), devices=devices)


def check_experts(model_config, devices: int):
  """Raises unless a mixture of experts can split its experts over `devices` devices (the
  devices of the mesh axes that the rules split experts over)."""
  if devices == 1 or not model_config.moe_experts:
    return
  if model_config.moe_experts % devices:
    raise ConfigError(f'moe_experts={model_config.moe_experts} is not divisible by the '
                      f'{devices} devices the experts are split over; pick a divisor for '
                      '--mesh=expert:N')
  if model_config.moe_compute != 'dropless':
    raise ConfigError(f'moe_compute={model_config.moe_compute} is not implemented with the '
                      'experts split over devices (an expert mesh axis); use dropless')


def initialize_distributed(coordinator_address=None, num_processes=None, process_id=None):
  """Joins this process to a multi-process run; arguments left None are read by JAX from
  the environment (TPU VMs, SLURM, Open MPI) where it knows how."""
  try:
    jax.distributed.initialize(coordinator_address=coordinator_address,
                               num_processes=num_processes, process_id=process_id)
  except (ValueError, RuntimeError) as e:
    raise ConfigError(f'cannot join the multi-process run ({str(e).splitlines()[0][:200]}); '
                      'give --coordinator_address, --num_processes and --process_id') from None


@dataclasses.dataclass(frozen=True)
class Layout:
  """Where a run's arrays live: the mesh and the logical-axis rules on it."""
  rules: sharding.Rules

  @classmethod
  def create(cls, mesh_text: str, rules_text: str, model_config, devices=None):
    mesh = make_mesh(mesh_text, devices)
    rules = sharding.parse_rules(rules_text)
    # The experts are split over the mesh axes their rule names (`expert` by default).
    check_experts(model_config, math.prod(mesh.shape[a] for a in rules[sharding.EXPERT]
                                          if a in mesh.shape))
    # MLA expands its latents to n_heads key/value heads.
    kv_heads = (model_config.n_heads if model_config.attention_type == 'mla'
                else model_config.n_kv_heads)
    units = {sharding.HEADS: model_config.n_heads, sharding.KV_HEADS: kv_heads}
    return cls(sharding.Rules(mesh, rules, units))

  @property
  def mesh(self):
    return self.rules.mesh

  @property
  def replicated(self):
    return NamedSharding(self.mesh, PartitionSpec())

  def state_shardings(self, abstract_state):
    return self.rules.tree_shardings(abstract_state)

  def abstract(self, abstract_state):
    """abstract_state (from jax.eval_shape) with the shardings its arrays get here."""
    return jax.tree.map(lambda leaf, where: jax.ShapeDtypeStruct(leaf.shape, leaf.dtype,
                                                                  sharding=where),
                        abstract_state, self.state_shardings(abstract_state))

  def put_replicated(self, value):
    """A numpy value (the same on every process) as an array on every device."""
    value = np.asarray(value)
    return jax.make_array_from_callback(value.shape, self.replicated, lambda index: value[index])

  def batch_ways(self) -> int:
    """How many pieces a batch is split into."""
    return math.prod(self.mesh.shape[a] for a in self.rules.rules[sharding.BATCH])

  def batch_sharding(self, shape, *, batch_axis: int = 0):
    axes = [None] * len(shape)
    axes[batch_axis] = sharding.BATCH
    return self.rules.sharding(axes, shape)

  def put_batch(self, batch: dict, *, batch_axis: int = 0) -> dict:
    """Numpy arrays (the same on every process) as global arrays split over the batch axes;
    each process transfers only the rows of its own devices."""
    def put(array):
      array = np.asarray(array)
      return jax.make_array_from_callback(
          array.shape, self.batch_sharding(array.shape, batch_axis=batch_axis),
          lambda index: array[index])
    return {name: put(array) for name, array in batch.items()}


def bytes_per_device(tree) -> int:
  """The most bytes of `tree` any one local device holds."""
  held = collections.Counter()
  for leaf in jax.tree.leaves(tree):
    for shard in leaf.addressable_shards:
      held[shard.device] += shard.data.nbytes
  return max(held.values(), default=0)
