"""The MLP of a block in transformers' checkpoints, dense or a mixture of experts.

Checkpoints keep each expert as its own three Linear layers (experts.<j>.<name>.weight,
[out, in]); ours stacks them into one [E, in, out] array per projection (models/moe.py).
The router is a Linear [E, D] without bias; shared experts are a plain MLP.
"""
import dataclasses

import numpy as np

from lmlab.models.errors import CheckpointError
from lmlab.models.hf.architecture import Link, field, linear

DENSE_NAMES = (('gate_proj', 'gate'), ('up_proj', 'up'), ('down_proj', 'down'))


@dataclasses.dataclass(frozen=True)
class ExpertLayout:
  """Where an architecture keeps a mixture of experts' tensors, under model.layers.<i>."""
  block: str                   # the sublayer: 'mlp' (Qwen, DeepSeek), 'block_sparse_moe'
  projections: tuple           # the checkpoint's names of the experts' gate, up, down
  shared: str = ''             # the shared expert's MLP, if any
  shared_gate: str = ''        # the shared expert's sigmoid gate, a Linear [1, D], if any


MIXTRAL = ExpertLayout('block_sparse_moe', ('w1', 'w3', 'w2'))
QWEN2_MOE = ExpertLayout('mlp', ('gate_proj', 'up_proj', 'down_proj'), 'shared_expert',
                         'shared_expert_gate')
QWEN3_MOE = ExpertLayout('mlp', ('gate_proj', 'up_proj', 'down_proj'))
DEEPSEEK_V2 = ExpertLayout('mlp', ('gate_proj', 'up_proj', 'down_proj'), 'shared_experts')


def dense_mlp_links(config, hf_prefix: str, ours: tuple) -> list:
  links = []
  for hf_name, name in DENSE_NAMES:
    links += linear(f'{hf_prefix}.{hf_name}', ours + (name,), bias=config.use_bias)
  return links


def _stack_transposed(arrays: list) -> list:
  return [np.stack([a.T for a in arrays])]


def _unstack_transposed(arrays: list) -> list:
  return [w.T for w in arrays[0]]


def mlp_links(config, layer: int, layout: ExpertLayout | None) -> list:
  """The links of block `layer`'s MLP: dense (under 'mlp'), or its experts as `layout` says."""
  hf, ours = f'model.layers.{layer}.', ('blocks', layer, 'mlp')
  if layout is None or not config.is_moe_layer(layer):
    return dense_mlp_links(config, hf + 'mlp', ours)
  prefix = hf + layout.block
  links = linear(prefix + '.gate', ours + ('router',), bias=False)
  for hf_name, name in zip(layout.projections, ('expert_gate', 'expert_up', 'expert_down')):
    links.append(Link(tuple(f'{prefix}.experts.{j}.{hf_name}.weight'
                            for j in range(config.moe_experts)),
                      (ours + (name,),), _stack_transposed, _unstack_transposed))
  if config.moe_shared_ffn_dim:
    links += dense_mlp_links(config, f'{prefix}.{layout.shared}', ours + ('shared',))
  if config.moe_shared_gate:
    links += linear(f'{prefix}.{layout.shared_gate}', ours + ('shared_gate',), bias=False)
  return links


def moe_ffn_dim_from_hf(hf_config: dict, name: str) -> int:
  """ModelConfig.moe_ffn_dim of an expert width: 0 when it is the dense MLP's."""
  width = field(hf_config, name)
  return 0 if width == field(hf_config, 'intermediate_size') else width


def qwen_moe_from_hf(hf_config: dict, *, shared: bool) -> dict:
  """The expert fields of a Qwen2-MoE or Qwen3-MoE config.json. Its layer i is MoE unless it
  is in mlp_only_layers or (i + 1) % decoder_sparse_step != 0; of mlp_only_layers we take
  the form 0..k-1 (moe_first_dense=k)."""
  n_layers = field(hf_config, 'num_hidden_layers')
  dense = field(hf_config, 'mlp_only_layers', [], expected=list)
  first_dense = len(dense)
  if dense != list(range(first_dense)):
    raise CheckpointError(f'config.json mlp_only_layers={dense!r:.60} is not supported: only '
                          f'the first layers (0..k-1) of the {n_layers} may be dense')
  # Qwen3-MoE as transformers 5 saves it says num_local_experts; the published ones num_experts.
  experts_name = 'num_experts' if 'num_local_experts' not in hf_config else 'num_local_experts'
  fields = dict(moe_experts=field(hf_config, experts_name),
                moe_top_k=field(hf_config, 'num_experts_per_tok'),
                moe_ffn_dim=moe_ffn_dim_from_hf(hf_config, 'moe_intermediate_size'),
                moe_norm_topk=field(hf_config, 'norm_topk_prob', False, expected=bool),
                moe_first_dense=first_dense,
                moe_layer_freq=field(hf_config, 'decoder_sparse_step', 1),
                moe_aux_loss_weight=field(hf_config, 'router_aux_loss_coef', 0.001,
                                          expected=float))
  if shared:
    fields['moe_shared_ffn_dim'] = field(hf_config, 'shared_expert_intermediate_size')
  return fields


def qwen_moe_to_hf(config, *, shared: bool) -> dict:
  fields = dict(num_experts=config.moe_experts, num_experts_per_tok=config.moe_top_k,
                moe_intermediate_size=config.expert_ffn_dim,
                norm_topk_prob=config.moe_norm_topk,
                mlp_only_layers=list(range(config.moe_first_dense)),
                decoder_sparse_step=config.moe_layer_freq,
                router_aux_loss_coef=config.moe_aux_loss_weight)
  if shared:
    fields['shared_expert_intermediate_size'] = config.moe_shared_ffn_dim
  return fields
