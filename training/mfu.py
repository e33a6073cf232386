"""Model FLOPs utilisation: the training FLOPs a step's tokens need, over what the devices
could do at their peak.

FLOPs per token follow Chowdhery et al. 2022 (PaLM, appendix B): 6N for the weights (N the
parameters a token is multiplied by: the blocks' matrices and the output head, not the
embedding lookup) plus the attention's score and value products, 3 x 2 x L x H x (d_qk + d_v)
x the keys a query sees. PaLM's 12 L H Q T counts every key; here a causal query at position
i sees i + 1 keys (at most the sliding window), so the attention term is about halved.
"""
import jax
import numpy as np
from flax import nnx

from lmlab.models.moe import unchosen_expert_params
from lmlab.models.lora import float_config
from lmlab.models.registry import abstract_model

# Dense bfloat16 peak FLOP/s of one JAX device (vendor data sheets; a TPU v2/v3 chip is two
# devices, so half the chip's), by a piece of jax.Device.device_kind; the first match wins,
# so the more specific names come first.
PEAK_FLOPS = (
    ('H100 PCIe', 756e12), ('H100 NVL', 835e12), ('H100', 989e12), ('GH200', 989e12),
    ('H200', 989e12), ('B200', 2250e12), ('A100', 312e12), ('L40S', 362e12),
    ('L40', 181e12), ('L4', 121e12), ('A10G', 70e12), ('TPU v6 lite', 918e12),
    ('TPU v6e', 918e12), ('TPU v5 lite', 197e12), ('TPU v5e', 197e12), ('TPU v5p', 459e12),
    ('TPU v5', 459e12), ('TPU v4', 275e12), ('TPU v3', 61.5e12), ('TPU v2', 22.5e12),
)


def peak_flops(device_kind: str):
  """The table's peak for a device kind, or None (CPUs, devices not in the table)."""
  return next((peak for name, peak in PEAK_FLOPS if name in device_kind), None)


def matmul_params(config) -> int:
  """Weights each token is multiplied by once per forward pass: the blocks' matrices (a QLoRA
  kernel as the values it stands for; of a mixture of experts, the top_k experts chosen and
  the router) and the output head (tied or not)."""
  blocks = abstract_model(float_config(config)).blocks
  block_weights = sum(leaf.size for leaf in jax.tree.leaves(nnx.state(blocks, nnx.Param))
                      if leaf.ndim >= 2)
  return block_weights - unchosen_expert_params(config) + config.d_model * config.vocab_size


def mean_visible_keys(config, seq_len: int) -> float:
  """Keys a query of a seq_len sequence attends to, on average."""
  if not config.causal:
    return float(seq_len)
  seen = np.arange(1, seq_len + 1)
  if config.sliding_window:
    seen = np.minimum(seen, config.sliding_window)
  return float(seen.mean())


def train_flops_per_token(config, seq_len: int) -> float:
  """Forward and backward FLOPs per token of a decoder trained on seq_len sequences."""
  if config.family != 'decoder':
    raise ValueError(f'FLOPs per token are worked out for decoders, not {config.family}')
  v_dim = config.v_head_dim if config.attention_type == 'mla' else config.resolved_head_dim
  attention = (2 * config.n_layers * config.n_heads * (config.qk_head_dim + v_dim)
               * mean_visible_keys(config, seq_len))
  return 3 * (2 * matmul_params(config) + attention)
