"""AdamW with linear warmup, cosine decay (or the inverse square root of Vaswani et al.
2017) and global-norm clipping."""
import dataclasses
from typing import Literal

import jax
import jax.numpy as jnp
import optax

# Post-LN stacks (BERT, the encoder-decoder) stall at the decoders' 3e-3 (Xiong et al. 2020).
DEFAULT_LEARNING_RATE = 3e-3
POST_LN_LEARNING_RATE = 1e-3


@dataclasses.dataclass(frozen=True)
class OptimizerConfig:
  """AdamW's settings; each field's comment is its --flag's help text."""
  # Peak learning rate; default 3e-3, and 1e-3 for BERT and encoder-decoder models (post-LN).
  learning_rate: float | None = None
  warmup_steps: int = 50  # Linear warmup steps.
  total_steps: int = 0  # Length of the decay schedule (--schedule_steps); 0: the run's --steps.
  final_lr_fraction: float = 0.1  # Cosine schedule: the final learning rate's share of the peak.
  weight_decay: float = 0.1  # AdamW weight decay (matrices only).
  beta1: float = 0.9  # Adam's first-moment decay.
  beta2: float = 0.95  # Adam's second-moment decay.
  eps: float = 1e-8  # Adam's denominator epsilon.
  clip_norm: float = 1.0  # Global gradient-norm clip.
  # Learning-rate decay after warmup: cosine, or 1/sqrt(step) as Vaswani et al. 2017.
  schedule: Literal['cosine', 'inverse_sqrt'] = 'cosine'

  def resolved(self, steps: int, family: str) -> 'OptimizerConfig':
    """The config with the defaults that depend on the run filled in."""
    rate = self.learning_rate
    if rate is None:
      rate = DEFAULT_LEARNING_RATE if family == 'decoder' else POST_LN_LEARNING_RATE
    return dataclasses.replace(self, learning_rate=rate, total_steps=self.total_steps or steps)


def schedule(config: OptimizerConfig):
  """0 -> learning_rate linearly over warmup_steps, then cosine down to final_lr_fraction;
  or with schedule='inverse_sqrt', down as 1/sqrt(step): the paper's
  d^-0.5 min(step^-0.5, step warmup^-1.5) with its peak at learning_rate."""
  if config.schedule == 'inverse_sqrt':
    warmup = max(config.warmup_steps, 1)
    return lambda step: config.learning_rate * jnp.minimum(
        step / warmup, jnp.sqrt(warmup / jnp.maximum(step, 1)))
  warmup = min(config.warmup_steps, config.total_steps)
  return optax.warmup_cosine_decay_schedule(
      init_value=0.0, peak_value=config.learning_rate, warmup_steps=warmup,
      decay_steps=max(config.total_steps, warmup + 1),
      end_value=config.learning_rate * config.final_lr_fraction)


def decay_mask(params):
  """Weight decay on matrices (projections, embeddings) only, never on norms or biases."""
  return jax.tree.map(lambda p: p.ndim >= 2, params)


def make_optimizer(config: OptimizerConfig):
  """The optimizer of a resolved config (OptimizerConfig.resolved)."""
  if config.learning_rate is None or not config.total_steps:
    raise ValueError(f'{config} is not resolved: call OptimizerConfig.resolved first')
  return optax.chain(
      optax.clip_by_global_norm(config.clip_norm),
      optax.adamw(schedule(config), b1=config.beta1, b2=config.beta2, eps=config.eps,
                  weight_decay=config.weight_decay, mask=decay_mask))
