"""The mixture-of-experts feed-forward sublayer: a router sends each token to top_k of E
expert MLPs and sums their outputs, weighted.

Axes (docs/AXES.md): N tokens (batch x length), E experts, K the experts chosen per token,
A assignments (N x K), C an expert's capacity, G groups of experts, R rows sent to or
received from the other devices, L MoE layers; d model features, f an expert's hidden units.

Routers (ModelConfig.moe_router), on logits s = x W_r computed in float32:
  softmax_topk  p = softmax(s); the k largest p_i are the weights, divided by their sum when
                moe_norm_topk (Qwen-MoE, DeepSeek). Switch Transformer's router is this with
                top_k=1 (Fedus et al. 2021).
  topk_softmax  softmax over the k largest logits (Mixtral); the same weights as softmax_topk
                renormalised.
With moe_groups > 0 the experts form that many groups and a token picks its k experts from
the moe_topk_groups groups whose best expert scores highest (DeepSeek-V2's group-limited
greedy). The weights are then times moe_routed_scale.
Shared experts (moe_shared_ffn_dim > 0) are one MLP every token goes through beside the
routed ones (DeepSeekMoE); with moe_shared_gate its output is scaled by sigmoid(x w)
(Qwen2-MoE).

Compute (moe_compute):
  dropless  the assignments sorted by expert, each expert's rows multiplied as one group
            (kernels/grouped_matmul.py, moe_matmul): the FLOPs of k experts per token (and
            some padding), no token dropped.
  capacity  GShard's: each expert takes at most c = ceil(moe_capacity_factor * a / e)
            assignments, every token's first choice before any second one, in token order;
            the rest are dropped (the residual stream carries those tokens on).
  dense     every expert on every token, weighted by the router (zero outside the top k):
            e / k times the FLOPs; exact, and the anchor of benchmarks/moe.py.

Under nnx.capture(..., nnx.Intermediate) each MoE layer records its router statistics, of
which `router_losses` makes the auxiliary losses that training adds:
  balance  e * sum_i f_i P_i (Switch Transformer's eq. 4, GShard's): f_i the share of
           tokens that have expert i among their k (the f_i sum to k), P_i the mean router
           probability of expert i. k when perfectly balanced; transformers' MoE models
           compute the same (load_balancing_loss_func) and weigh it by router_aux_loss_coef.
  z        the mean of (logsumexp s)^2 (ST-MoE, Zoph et al. 2022).
"""
import math

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import PartitionSpec as P

from lmlab.kernels.grouped_matmul import Grouping
from lmlab.models.dense import Dense
from lmlab.models.mlp import ACTIVATIONS, GATED, MLP
from lmlab.models.sharding import EMBED, EXPERT, MLP as HIDDEN, expert_partition, param

STATS = 'moe_stats'


class MoE(nnx.Module):

  def __init__(self, config, *, init_scale: float, dtype, param_dtype, rngs):
    self.config, self.dtype = config, dtype
    e, d, f = config.moe_experts, config.d_model, config.expert_ffn_dim

    def experts(d_in, d_out, axes, std):
      return param(nnx.initializers.normal(std)(rngs.params(), (e, d_in, d_out), param_dtype),
                   axes)

    std = config.init_std * init_scale
    self.router = Dense(d, e, axes=(EMBED, None), use_bias=False, init_std=config.init_std,
                        dtype=jnp.float32, param_dtype=param_dtype, rngs=rngs)
    self.expert_gate = (experts(d, f, (EXPERT, EMBED, HIDDEN), std) if config.mlp in GATED
                        else None)
    self.expert_up = experts(d, f, (EXPERT, EMBED, HIDDEN), std)
    self.expert_down = experts(f, d, (EXPERT, HIDDEN, EMBED), std)
    self.shared = (MLP(config, ffn_dim=config.moe_shared_ffn_dim, init_scale=init_scale,
                       dtype=dtype, param_dtype=param_dtype, rngs=rngs)
                   if config.moe_shared_ffn_dim else None)
    self.shared_gate = (Dense(d, 1, axes=(EMBED, None), use_bias=False,
                              init_std=config.init_std, dtype=dtype, param_dtype=param_dtype,
                              rngs=rngs) if config.moe_shared_gate else None)

  def __call__(self, x_btd, dropout_key=None):
    """dropout_key: no dropout inside the experts; taken for MLP's signature."""
    del dropout_key
    b, t, d = x_btd.shape
    x_Nd = x_btd.reshape(b * t, d).astype(self.dtype)
    logits_NE = self.router(x_Nd.astype(jnp.float32))
    experts_NK, weights_NK, probs_NE = route(logits_NE, self.config)
    partition = expert_partition(b * t)
    if partition is not None:
      y_Nd, dropped = self._expert_parallel(partition, x_Nd, experts_NK,
                                            weights_NK.astype(self.dtype))
    else:
      compute = {'dropless': self._dropless, 'capacity': self._capacity,
                 'dense': self._dense}[self.config.moe_compute]
      y_Nd, dropped = compute(x_Nd, experts_NK, weights_NK.astype(self.dtype))
    if self.shared is not None:
      shared_Nd = self.shared(x_Nd)
      if self.shared_gate is not None:
        shared_Nd = shared_Nd * jax.nn.sigmoid(self.shared_gate(x_Nd))
      y_Nd = y_Nd + shared_Nd
    if hasattr(self, '__captures__'):  # Inside nnx.capture; outside, sow would keep state.
      self.sow(nnx.Intermediate, STATS, router_stats(logits_NE, probs_NE, experts_NK, dropped))
    return y_Nd.reshape(b, t, d)

  def _hidden(self, x, matmul):
    """The experts' hidden units of rows x, each row's expert's weights applied by
    matmul(x, weights [E, ...])."""
    gate = None if self.expert_gate is None else self.expert_gate[...].astype(self.dtype)
    return self._hidden_with(x, matmul, gate, self.expert_up[...].astype(self.dtype))

  def _hidden_with(self, x, matmul, gate, up):
    """_hidden with these gate (None for a plain MLP) and up matrices."""
    activation = ACTIVATIONS[self.config.mlp]
    if gate is None:
      return activation(matmul(x, up))
    return activation(matmul(x, gate)) * matmul(x, up)

  def _dropless(self, x_Nd, experts_NK, weights_NK):
    n, k = experts_NK.shape
    expert_A = experts_NK.reshape(n * k)
    order_A = jnp.argsort(expert_A, stable=True)
    grouping = Grouping(expert_A[order_A], self.config.moe_experts, self.config.moe_matmul)
    x_Rd = grouping.pack(x_Nd[order_A // k])
    y_Rd = grouping.matmul(self._hidden(x_Rd, grouping.matmul),
                           self.expert_down[...].astype(self.dtype))
    y_NKd = grouping.unpack(y_Rd)[jnp.argsort(order_A)].reshape(n, k, -1)
    return jnp.einsum('nkd,nk->nd', y_NKd, weights_NK), jnp.zeros((), jnp.float32)

  def _expert_parallel(self, partition, x_Nd, experts_NK, weights_NK):
    """Dropless, with the experts split over the P devices of one mesh axis: each device
    sends every assignment of its tokens to the device holding its expert (an all-to-all of
    [P, assignments, D] buffers, room for all of them going to one device), which computes
    its experts on the rows it receives and sends the results back."""
    axis, spec = partition.axis, partition.token_spec
    devices = partition.mesh.shape[axis]
    local = self.config.moe_experts // devices
    matrices = {name: getattr(self, 'expert_' + name)[...] for name in ('gate', 'up', 'down')
                if getattr(self, 'expert_' + name) is not None}

    def per_device(x_Nd, experts_NK, weights_NK, matrices):
      n, k = experts_NK.shape
      device_A = (experts_NK // local).reshape(n * k)
      slot_A = rank_among_equals(device_A, devices)
      send_pad = jnp.zeros((devices, n * k, x_Nd.shape[1]), x_Nd.dtype).at[
          device_A, slot_A].set(x_Nd[jnp.arange(n * k) // k])
      # The local expert of each row; `local` (one past the last) marks an empty row.
      send_expert = jnp.full((devices, n * k), local, jnp.int32).at[device_A, slot_A].set(
          (experts_NK % local).reshape(n * k))
      exchange = lambda x: jax.lax.all_to_all(x, axis, 0, 0)
      rows_Rd = exchange(send_pad).reshape(devices * n * k, -1)
      expert_R = exchange(send_expert).reshape(-1)
      order_R = jnp.argsort(expert_R, stable=True)
      grouping = Grouping(expert_R[order_R], local + 1, self.config.moe_matmul)
      # The empty rows' group has zero matrices.
      padded = {name: jnp.concatenate([w.astype(self.dtype),
                                       jnp.zeros((1, *w.shape[1:]), self.dtype)])
                for name, w in matrices.items()}
      hidden = self._hidden_with(grouping.pack(rows_Rd[order_R]), grouping.matmul,
                                 padded.get('gate'), padded['up'])
      out_Rd = grouping.unpack(grouping.matmul(hidden, padded['down']))[jnp.argsort(order_R)]
      y_NKd = exchange(out_Rd.reshape(devices, n * k, -1))[device_A, slot_A].reshape(n, k, -1)
      return jnp.einsum('nkd,nk->nd', y_NKd, weights_NK)

    y_Nd = jax.shard_map(per_device, mesh=partition.mesh,
                         in_specs=(spec, spec, spec, {name: P(axis) for name in matrices}),
                         out_specs=spec, check_vma=False)(x_Nd, experts_NK, weights_NK,
                                                          matrices)
    return y_Nd, jnp.zeros((), jnp.float32)

  def _capacity(self, x_Nd, experts_NK, weights_NK):
    n, k = experts_NK.shape
    e = self.config.moe_experts
    capacity = max(1, math.ceil(self.config.moe_capacity_factor * n * k / e))
    # Priority: every token's first choice, then every second one, each in token order.
    slot_NK = rank_among_equals(experts_NK.T.reshape(k * n), e).reshape(k, n).T
    kept_NK = slot_NK < capacity
    buffer_ECd = jnp.zeros((e, capacity, x_Nd.shape[1]), x_Nd.dtype).at[
        experts_NK, slot_NK].set(jnp.broadcast_to(x_Nd[:, None], (n, k, x_Nd.shape[1])),
                                 mode='drop')
    per_expert = lambda x, w: jnp.einsum('ecd,edf->ecf', x, w)
    out_ECd = per_expert(self._hidden(buffer_ECd, per_expert),
                         self.expert_down[...].astype(self.dtype))
    y_NKd = out_ECd.at[experts_NK, slot_NK].get(mode='fill', fill_value=0)
    y_Nd = jnp.einsum('nkd,nk->nd', y_NKd, weights_NK * kept_NK)
    return y_Nd, jnp.mean(~kept_NK, dtype=jnp.float32)

  def _dense(self, x_Nd, experts_NK, weights_NK):
    n, k = experts_NK.shape
    e = self.config.moe_experts
    every = lambda x, w: jnp.einsum('end,edf->enf', x, w)
    out_ENd = every(self._hidden(jnp.broadcast_to(x_Nd, (e, *x_Nd.shape)), every),
                    self.expert_down[...].astype(self.dtype))
    weights_NE = jnp.zeros((n, e), weights_NK.dtype).at[
        jnp.arange(n)[:, None], experts_NK].add(weights_NK)
    return jnp.einsum('end,ne->nd', out_ENd, weights_NE), jnp.zeros((), jnp.float32)


def rank_among_equals(ids_A, n_ids: int):
  """For each entry of ids_A (each in [0, n_ids)), how many entries before it hold the same
  id: its slot in that id's buffer."""
  seen_Ax = jnp.cumsum(jax.nn.one_hot(ids_A, n_ids, dtype=jnp.int32), axis=0)
  return seen_Ax[jnp.arange(ids_A.shape[0]), ids_A] - 1


def unchosen_expert_params(config) -> int:
  """Parameters of the experts a token's router does not choose: all but top_k of every MoE
  layer's (the total less these are the parameters a token is multiplied by)."""
  per_expert = (3 if config.mlp in GATED else 2) * config.d_model * config.expert_ffn_dim
  return config.moe_layers * (config.moe_experts - config.moe_top_k) * per_expert


def route(logits_NE, config):
  """(experts [N, K], their weights [N, K], router probabilities [N, E]) of router logits."""
  probs_NE = jax.nn.softmax(logits_NE, axis=-1)
  k = config.moe_top_k
  scores_NE = probs_NE if config.moe_router == 'softmax_topk' else logits_NE
  if config.moe_groups:
    n, e = scores_NE.shape
    groups = config.moe_groups
    best_NG = jnp.max(scores_NE.reshape(n, groups, e // groups), axis=-1)
    _, chosen_NG = jax.lax.top_k(best_NG, config.moe_topk_groups)
    allowed_NG = jnp.zeros((n, groups), bool).at[jnp.arange(n)[:, None], chosen_NG].set(True)
    allowed_NE = jnp.repeat(allowed_NG, e // groups, axis=1)
    scores_NE = jnp.where(allowed_NE, scores_NE, -jnp.inf if config.moe_router ==
                          'topk_softmax' else 0.0)
  top_NK, experts_NK = jax.lax.top_k(scores_NE, k)
  if config.moe_router == 'topk_softmax':
    weights_NK = jax.nn.softmax(top_NK, axis=-1)
  elif config.moe_norm_topk:
    weights_NK = top_NK / jnp.sum(top_NK, axis=-1, keepdims=True)
  else:
    weights_NK = top_NK
  return experts_NK, weights_NK * config.moe_routed_scale, probs_NE


def router_stats(logits_NE, probs_NE, experts_NK, dropped):
  """What one layer records: the share of tokens choosing each expert [E] (summing to k), the
  mean router probability [E], the mean squared log-partition and the dropped share."""
  e = logits_NE.shape[-1]
  n = logits_NE.shape[0]
  load_E = jnp.bincount(experts_NK.reshape(-1), length=e).astype(jnp.float32) / n
  return {'load': load_E, 'probability': jnp.mean(probs_NE, axis=0),
          'z': jnp.mean(jnp.square(jax.nn.logsumexp(logits_NE, axis=-1))), 'dropped': dropped}


def balance_loss(load_E, probability_E):
  return load_E.shape[-1] * jnp.sum(load_E * probability_E, axis=-1)


def router_losses(stats, config):
  """(the weighted auxiliary loss to add, metrics) of the statistics an nnx.capture collected
  (a State holding each MoE layer's records, one per call), averaged over layers and calls;
  moe_max_load_<i> is block i's busiest expert's share of its assignments (1/E balanced)."""
  layers = [(path, calls.get_value()) for path, calls in nnx.to_flat_state(stats)]
  records = [record for _, calls in layers for record in calls]
  if not records:
    return 0.0, {}
  stacked = jax.tree.map(lambda *xs: jnp.stack(xs), *records)
  share_LE = stacked['load'] / config.moe_top_k
  metrics = {'moe_balance': jnp.mean(balance_loss(stacked['load'], stacked['probability'])),
             'moe_z': jnp.mean(stacked['z']),
             'moe_dropped': jnp.mean(stacked['dropped']),
             # 1 when every layer spreads its assignments evenly, 0 when all go to one.
             'moe_load_entropy': jnp.mean(-jnp.sum(share_LE * jnp.log(
                 jnp.maximum(share_LE, 1e-12)), axis=-1)) / np.log(config.moe_experts)}
  for path, calls in layers:  # path: (..., block index, 'mlp', STATS)
    share_E = jnp.mean(jnp.stack([record['load'] for record in calls]), axis=0)
    metrics[f'moe_max_load_{path[-3]}'] = jnp.max(share_E) / config.moe_top_k
  total = (config.moe_aux_loss_weight * metrics['moe_balance']
           + config.moe_z_loss_weight * metrics['moe_z'])
  return total, metrics


def with_router_losses(fn):
  """fn(model, ...) -> (loss, metrics) made to add the router losses of the MoE layers it
  runs in `model` (none for a dense model: fn itself)."""

  def wrapped(model, *args):
    config = model.config
    if not config.moe_experts:
      return fn(model, *args)
    (loss, metrics), stats = nnx.capture(fn, nnx.Intermediate)(model, *args)
    extra, moe_metrics = router_losses(stats, config)
    return loss + extra, {**metrics, **moe_metrics}

  return wrapped
