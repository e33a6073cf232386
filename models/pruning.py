"""One-shot pruning of a decoder's dense kernels, kept pruned by a stored 0/1 mask that
multiplies each kernel as it is used (so that a recovery fine-tune gives the pruned weights no
gradient, and they stay zero).

Scores, for a kernel W [D_in, D_out] (weight i of output channel j: W_ij):
  magnitude  |W_ij|
  wanda      |W_ij| * ||X_i||_2 (Sun et al. 2024), X_i the i-th input feature over the tokens
             of a few calibration batches
Patterns (`prune` spec):
  unstructured:<s>  in each output channel, the round(s * D_in) lowest-scoring weights are
                    zeroed: Wanda's per-output comparison, used for magnitude too (the Wanda
                    paper finds it better than one threshold per layer for LLMs)
  <n>:<m>           of each m consecutive weights along the input axis of each output channel,
                    all but the n highest-scoring are zeroed: 2:4 is the semi-structured
                    sparsity of NVIDIA's sparse tensor cores
Ties are broken by position (a stable sort). Covered: the Dense layers of the blocks, as in
Wanda; not the routers and gates, the embeddings or the LM head.
"""
import dataclasses
import re

import jax
import jax.numpy as jnp
from flax import nnx

from lmlab.models import sharding
from lmlab.models.dense import Dense
from lmlab.models.errors import ConfigError
from lmlab.models.weight_quant import KEPT_LAYERS

SCORES = ('magnitude', 'wanda')
# What a covered Dense sows under record_inputs: the sum of squares of each input feature.
INPUT_SQUARES = 'input_squares'


class PruneMask(nnx.Variable):
  """True where a kernel's weight is kept: frozen, no nnx.Param, so no optimizer state or
  gradient is made for it."""


@dataclasses.dataclass(frozen=True)
class PruneSpec:
  sparsity: float  # unstructured: the share zeroed; n:m: 1 - n/m.
  n: int = 0       # n:m: weights kept of each m; 0: unstructured.
  m: int = 0


def parse_spec(spec: str) -> PruneSpec:
  unstructured = re.fullmatch(r'unstructured:([0-9.eE+-]+)', spec)
  if unstructured:
    try:
      sparsity = float(unstructured.group(1))
    except ValueError:
      sparsity = -1.0
    if not 0 <= sparsity < 1:
      raise ConfigError(f'--prune={spec!r}: the sparsity must be a number in [0, 1)')
    return PruneSpec(sparsity)
  n_m = re.fullmatch(r'(\d+):(\d+)', spec)
  if n_m and 0 < int(n_m.group(1)) < int(n_m.group(2)):
    n, m = int(n_m.group(1)), int(n_m.group(2))
    return PruneSpec(1 - n / m, n, m)
  raise ConfigError(f'--prune={spec!r} is not unstructured:<sparsity in [0, 1)> or n:m with '
                    '0 < n < m (2:4)')


def keep_mask(score_io, spec: PruneSpec):
  """True where a weight of score_io [D_in, D_out] is kept."""
  d_in, d_out = score_io.shape
  if spec.n:
    groups_gmo = score_io.reshape(d_in // spec.m, spec.m, d_out)
    rank_gmo = jnp.argsort(jnp.argsort(-groups_gmo, axis=1, stable=True), axis=1, stable=True)
    return (rank_gmo < spec.n).reshape(d_in, d_out)
  pruned = round(spec.sparsity * d_in)
  rank_io = jnp.argsort(jnp.argsort(score_io, axis=0, stable=True), axis=0, stable=True)
  return rank_io >= pruned


def pruned_layers(model):
  """(path, Dense) of each layer that pruning covers."""
  return [(path, node) for path, node in nnx.iter_graph(model)
          if isinstance(node, Dense) and path and path[0] == 'blocks'
          and path[-1] not in KEPT_LAYERS]


def add_masks(model):
  """Every covered layer of `model` gets a mask of ones; changed in place and returned."""
  for _, layer in pruned_layers(model):
    layer.mask = sharding.param(jnp.ones(layer.kernel.shape, bool),
                                sharding.logical_axes(layer.kernel), kind=PruneMask)
  return model


def remove_masks(model):
  """`model` as a plain one: each masked kernel with its zeros written into it, the masks
  gone and config.pruned false; changed in place and returned."""
  for _, layer in pruned_layers(model):
    if layer.mask is not None:
      layer.kernel[...] = jnp.where(layer.mask[...], layer.kernel[...], 0)
      del layer.mask
  model.config = dataclasses.replace(model.config, pruned=False)
  return model


def input_norms(model, forward, batches) -> dict:
  """{(*layer path, INPUT_SQUARES): ||X_i||_2 [D_in]} of each covered layer's inputs over
  forward(model, batch) of each batch."""
  layers = pruned_layers(model)
  for _, layer in layers:
    layer.record_inputs = True
  graphdef, state = nnx.split(model)
  for _, layer in layers:
    layer.record_inputs = False

  @jax.jit
  def squares(state, batch):
    _, stats = nnx.capture(forward, nnx.Intermediate)(nnx.merge(graphdef, state), batch)
    return {path: sum(calls.get_value()) for path, calls in nnx.to_flat_state(stats)
            if path[-1] == INPUT_SQUARES}

  totals = {}
  for batch in batches:
    for path, value in squares(state, batch).items():
      totals[path] = totals.get(path, 0.0) + value
  return {path: jnp.sqrt(total) for path, total in totals.items()}


def prune(model, spec: PruneSpec, norms: dict | None = None) -> float:
  """Masks and zeroes the lowest-scoring weights of every covered layer of `model` (masks
  added where missing; the scores are Wanda's where input norms are given, else magnitudes),
  in place; returns the share of covered weights that are zero."""
  if not pruned_layers(model) or pruned_layers(model)[0][1].mask is None:
    add_masks(model)
  zeros = total = 0
  for path, layer in pruned_layers(model):
    kernel_io = layer.kernel[...]
    if spec.n and kernel_io.shape[0] % spec.m:
      raise ConfigError(f'--prune={spec.n}:{spec.m}: {spec.m} does not divide the input '
                        f'dimension {kernel_io.shape[0]} of {"/".join(map(str, path))}')
    score_io = jnp.abs(kernel_io.astype(jnp.float32))
    if norms is not None:
      score_io = score_io * norms[(*path, INPUT_SQUARES)][:, None]
    mask_io = keep_mask(score_io, spec) & layer.mask[...]
    layer.mask[...] = mask_io
    layer.kernel[...] = jnp.where(mask_io, kernel_io, 0).astype(kernel_io.dtype)
    zeros += int(jnp.sum(~mask_io))
    total += mask_io.size
  return zeros / max(total, 1)
