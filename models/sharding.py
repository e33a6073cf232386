"""Logical axis names on parameters and activations, and the rules that map them to a mesh.

Every parameter carries `logical_axes` metadata, one name (or None: never sharded) per
dimension, e.g. a query projection [d_model, heads * head_dim] is (EMBED, HEADS). The model
also names the axes of its main activations through `constrain`. Rules decide which mesh
axes each name is sharded over; the defaults give data parallelism over 'data', ZeRO-3
style FSDP over 'fsdp' (parameters split along d_model) and Megatron tensor parallelism over
'tensor' (heads, the MLP's hidden units and the vocabulary split):

    batch -> (data, fsdp, expert)   embed -> fsdp   heads, kv_heads, mlp, vocab -> tensor
    expert -> expert

The 'expert' axis splits a mixture of experts' experts (expert parallelism, models/moe.py)
and, everywhere else, the batch, as one more data-parallel axis.

A dimension is split only as far as it divides evenly, in whole units (a head is never cut
in two): with fewer KV heads than the tensor axis has devices, KV projections stay whole on
each device (replicated), which is what Megatron-style GQA does. A mesh axis is used at most
once per array.
"""
import contextlib
import contextvars
import dataclasses
import math

import jax
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec

from lmlab.kernels import attention as attention_lib
from lmlab.kernels.shard import Partition
from lmlab.models.errors import ConfigError

BATCH, LENGTH = 'batch', 'length'
EMBED, MLP, HEADS, KV_HEADS, VOCAB = 'embed', 'mlp', 'heads', 'kv_heads', 'vocab'
NORM = 'norm'  # norm scales and biases: small, kept whole by default.
EXPERT = 'expert'  # the experts of a mixture-of-experts layer.
LOGICAL_AXES = (BATCH, LENGTH, EMBED, MLP, HEADS, KV_HEADS, VOCAB, NORM, EXPERT)

DEFAULT_RULES = {BATCH: ('data', 'fsdp', 'expert'), LENGTH: (), EMBED: ('fsdp',),
                 MLP: ('tensor',), HEADS: ('tensor',), KV_HEADS: ('tensor',), VOCAB: ('tensor',),
                 NORM: (), EXPERT: ('expert',)}


def param(value, axes, kind=nnx.Param):
  """An nnx.Param (or a `kind` of it, such as nnx.LoRAParam) whose dimensions are named
  `axes`."""
  return kind(value, logical_axes=tuple(axes))


def initializer(init, axes):
  """`init` for a Flax layer (nnx.Embed's embedding_init) that names the dimensions."""
  return nnx.with_metadata(init, logical_axes=tuple(axes))


def logical_axes(variable) -> tuple | None:
  return variable.get_metadata().get('logical_axes')


def parse_rules(text: str) -> dict:
  """'embed:fsdp,mlp:tensor,batch:data+fsdp,length:none' -> DEFAULT_RULES with those
  names changed; '' gives the defaults."""
  rules = dict(DEFAULT_RULES)
  for item in filter(None, (part.strip() for part in text.split(','))):
    name, sep, axes = item.partition(':')
    if not sep or name not in LOGICAL_AXES:
      raise ConfigError(f'--logical_rules entry {item!r} is not <name>:<mesh axes>, with the '
                        f'name one of {", ".join(LOGICAL_AXES)} (e.g. embed:fsdp, '
                        'batch:data+fsdp, length:none)')
    rules[name] = () if axes in ('', 'none') else tuple(axes.split('+'))
    if len(set(rules[name])) != len(rules[name]):
      raise ConfigError(f'--logical_rules entry {item!r} names a mesh axis twice')
  return rules


@dataclasses.dataclass(frozen=True)
class Rules:
  """Logical names -> mesh axes, on `mesh`. units says how many indivisible pieces a named
  dimension holds where it flattens them (heads of a [heads * head_dim] projection); a
  dimension whose size is not a multiple of that count is made of size pieces."""
  mesh: jax.sharding.Mesh
  rules: dict
  units: dict = dataclasses.field(default_factory=dict)

  def __post_init__(self):
    for name, axes in self.rules.items():
      unknown = [a for a in axes if a not in self.mesh.shape]
      if unknown:
        raise ConfigError(f'logical axis {name!r} maps to {"+".join(unknown)}, not an axis of '
                          f'the mesh ({", ".join(self.mesh.axis_names)})')

  def spec(self, axes, shape) -> PartitionSpec:
    """The PartitionSpec of an array of `shape` whose dimensions are named `axes`."""
    used, entries = set(), []
    for name, size in zip(axes, shape):
      units = self.units.get(name, size)
      units = units if size % units == 0 else size
      chosen = []
      for axis in self.rules.get(name, ()) if name else ():
        split = math.prod(self.mesh.shape[a] for a in chosen) * self.mesh.shape[axis]
        if axis not in used and units % split == 0:
          chosen.append(axis)
      used.update(chosen)
      entries.append(tuple(chosen) if len(chosen) > 1 else (chosen[0] if chosen else None))
    return PartitionSpec(*entries)

  def sharding(self, axes, shape) -> NamedSharding:
    return NamedSharding(self.mesh, self.spec(axes, shape))

  def tree_shardings(self, tree):
    """NamedShardings for a tree of nnx Variables (parameters, optimizer moments), shaped
    like it; arrays outside a named Variable (step counters) are replicated."""
    def leaf_sharding(leaf):
      if isinstance(leaf, nnx.Variable):
        axes = logical_axes(leaf)
        value = leaf.get_value()
        return leaf.replace(self.sharding(axes or (None,) * value.ndim, value.shape))
      return NamedSharding(self.mesh, PartitionSpec())
    return jax.tree.map(leaf_sharding, tree, is_leaf=lambda x: isinstance(x, nnx.Variable))


_ACTIVE = contextvars.ContextVar('lmlab_activation_rules', default=None)


@contextlib.contextmanager
def activation_rules(rules: Rules):
  """Within this block, `constrain` shards the activations of models being traced."""
  token = _ACTIVE.set(rules)
  try:
    yield
  finally:
    _ACTIVE.reset(token)


def constrain(x, axes):
  """x with its dimensions named `axes` sharded by the active rules; x itself outside
  `activation_rules`."""
  rules = _ACTIVE.get()
  if rules is None:
    return x
  return jax.lax.with_sharding_constraint(x, rules.sharding(axes, x.shape))


def attention_partition(q_bthd, k_bskd) -> Partition | None:
  """How the active rules lay out attention's q and k/v (batch, then heads), for the
  kernels that XLA cannot partition; None outside `activation_rules`."""
  rules = _ACTIVE.get()
  if rules is None:
    return None
  return Partition(rules.mesh, rules.spec((BATCH, None, HEADS, None), q_bthd.shape),
                   rules.spec((BATCH, None, KV_HEADS, None), k_bskd.shape))


@dataclasses.dataclass(frozen=True)
class ExpertPartition:
  """How the active rules split a mixture of experts: the experts over the mesh axis
  `axis`, its tokens as `token_spec` says (a PartitionSpec of [tokens, features])."""
  mesh: jax.sharding.Mesh
  axis: str
  token_spec: PartitionSpec


def expert_partition(n_tokens: int) -> ExpertPartition | None:
  """The split of n_tokens tokens' mixture of experts under the active rules, when they
  split experts over devices; None otherwise (outside `activation_rules` too)."""
  rules = _ACTIVE.get()
  if rules is None:
    return None
  axes = [axis for axis in rules.rules.get(EXPERT, ()) if rules.mesh.shape[axis] > 1]
  if not axes:
    return None
  if len(axes) > 1:
    raise ConfigError(f'the experts are split over {"+".join(axes)}; expert parallelism '
                      'takes one mesh axis')
  return ExpertPartition(rules.mesh, axes[0], rules.spec((BATCH, None), (n_tokens, 1)))


def attention(q_bthd, k_bskd, v_bskd, **kwargs):
  """attention_lib.attention, split by batch and heads as the active rules say (see
  kernels/shard.py for how the kernels XLA cannot partition run)."""
  return attention_lib.attention(q_bthd, k_bskd, v_bskd, **kwargs,
                                 partition=attention_partition(q_bthd, k_bskd))
