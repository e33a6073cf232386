"""AdamW with linear warmup, cosine decay (or the inverse square root of Vaswani et al.
2017) and global-norm clipping."""
import dataclasses

import jax
import jax.numpy as jnp
import optax

SCHEDULES = ('cosine', 'inverse_sqrt')


@dataclasses.dataclass(frozen=True)
class OptimizerConfig:
  learning_rate: float = 3e-3
  warmup_steps: int = 50
  total_steps: int = 1000
  final_lr_fraction: float = 0.1
  weight_decay: float = 0.1
  beta1: float = 0.9
  beta2: float = 0.95
  eps: float = 1e-8
  clip_norm: float = 1.0
  schedule: str = 'cosine'  # or 'inverse_sqrt'


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
  return optax.chain(
      optax.clip_by_global_norm(config.clip_norm),
      optax.adamw(schedule(config), b1=config.beta1, b2=config.beta2, eps=config.eps,
                  weight_decay=config.weight_decay, mask=decay_mask))
