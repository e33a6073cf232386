r"""A mixture-of-experts layer's forward and backward pass, computed each way, in one run.

  python benchmarks/moe.py                    # 2048 tokens, d_model 256, experts 512 wide
  python benchmarks/moe.py --experts=8 --top_k=2 --tokens=8192

For each number of experts and top-k, times the jitted forward and backward pass (gradients
of every parameter and of the input) of models/moe.py's MoE layer, Mixtral-shaped (SwiGLU
experts, softmax over the top-k logits), computed:
  dropless   tokens sorted by expert, each expert's rows multiplied as a group (the default;
             --matmul: kernels/grouped_matmul.py's blocks or jax.lax.ragged_dot)
  capacity   GShard's buffers of 1.25x the mean load per expert, the rest dropped
  dense      every expert on every token, weighted by the router (E/k times the FLOPs)
beside transformers' MixtralSparseMoeBlock in PyTorch (CPU), the anchor: its 'eager'
experts loop over the experts that received tokens, gathering each one's rows, and its
'grouped_mm' experts (torch's grouped matrix product). Reports tokens per second (the
median of --repeats steps, the ways alternating so that drift hits all alike) and dropless
against dense. Active parameters stay fixed as the experts grow, so a compute that scales
with active parameters keeps its speed, and the dense product slows in proportion to E.
"""
import os

from absl import app, flags

from lmlab.benchmarks.timing import interleaved_medians

flags.DEFINE_list('experts', ['8', '16', '64'], 'Numbers of experts.')
flags.DEFINE_list('top_k', ['1', '2'], 'Experts per token.')
flags.DEFINE_integer('tokens', 2048, 'Tokens per step (batch x length).')
flags.DEFINE_integer('d_model', 256, 'Model width.')
flags.DEFINE_integer('expert_ffn_dim', 512, 'Hidden units of each expert.')
flags.DEFINE_enum('matmul', 'auto', ['auto', 'ragged_dot', 'blocks'], 'The dropless '
                  'grouped product (ModelConfig.moe_matmul; auto: blocks on a CPU).')
flags.DEFINE_integer('repeats', 6, 'Timed steps per way (the median is reported).')
flags.DEFINE_bool('torch', True, 'Time transformers\' PyTorch block too (needs torch and '
                  'transformers, the development requirements).')

FLAGS = flags.FLAGS
COMPUTES = ('dropless', 'capacity', 'dense')
TORCH_IMPLEMENTATIONS = ('eager', 'grouped_mm')


def config_for(experts: int, top_k: int, compute: str):
  from lmlab.models.config import ModelConfig
  return ModelConfig(vocab_size=64, d_model=FLAGS.d_model, n_heads=4, n_kv_heads=4,
                     ffn_dim=FLAGS.expert_ffn_dim, moe_experts=experts, moe_top_k=top_k,
                     moe_router='topk_softmax', moe_compute=compute,
                     moe_matmul=FLAGS.matmul).validate()


def jax_step(config, x_nd, cotangent_nd):
  """run() doing one jitted forward and backward pass of our layer."""
  import jax
  import jax.numpy as jnp
  from flax import nnx
  from lmlab.models.moe import MoE
  layer = MoE(config, init_scale=1.0, dtype=jnp.float32, param_dtype=jnp.float32,
              rngs=nnx.Rngs(0))
  graphdef, params = nnx.split(layer)

  def objective(params, x):
    return jnp.sum(nnx.merge(graphdef, params)(x[None])[0] * cotangent_nd)

  step = jax.jit(jax.grad(objective, argnums=(0, 1)))
  return lambda: jax.block_until_ready(step(params, x_nd))


def torch_step(experts: int, top_k: int, implementation: str, x_nd, cotangent_nd):
  """run() doing one forward and backward pass of transformers' MixtralSparseMoeBlock."""
  import torch
  from transformers import MixtralConfig
  from transformers.models.mixtral.modeling_mixtral import MixtralSparseMoeBlock
  config = MixtralConfig(hidden_size=FLAGS.d_model, intermediate_size=FLAGS.expert_ffn_dim,
                         num_local_experts=experts, num_experts_per_tok=top_k)
  config._experts_implementation = implementation
  torch.manual_seed(0)
  block = MixtralSparseMoeBlock(config).float()
  with torch.no_grad():
    for parameter in block.parameters():
      parameter.normal_(0.0, 0.02)
  x = torch.tensor(x_nd, requires_grad=True)
  cotangent = torch.tensor(cotangent_nd)

  def run():
    block.zero_grad()
    x.grad = None
    (block(x[None])[0] * cotangent).sum().backward()
  return run


def main(argv):
  del argv
  import jax
  import numpy as np
  rng = np.random.default_rng(0)
  x_nd = rng.normal(size=(FLAGS.tokens, FLAGS.d_model)).astype(np.float32)
  cotangent_nd = rng.normal(size=x_nd.shape).astype(np.float32)
  header = [*COMPUTES, *(f'torch {name}' for name in TORCH_IMPLEMENTATIONS if FLAGS.torch)]
  print(f'MoE layer forward+backward, {FLAGS.tokens} tokens, d_model {FLAGS.d_model}, experts '
        f'{FLAGS.expert_ffn_dim} wide (SwiGLU); {jax.devices()[0].device_kind}, '
        f'{os.cpu_count()} CPUs, JAX {jax.__version__}; tokens/s, median of {FLAGS.repeats}')
  print('\n| experts | top-k | ' + ' | '.join(header) + ' | dropless / dense |')
  print('|---:|---:|' + '---:|' * (len(header) + 1))
  for experts in map(int, FLAGS.experts):
    for top_k in map(int, FLAGS.top_k):
      runs = {compute: jax_step(config_for(experts, top_k, compute), x_nd, cotangent_nd)
              for compute in COMPUTES}
      if FLAGS.torch:
        for name in TORCH_IMPLEMENTATIONS:
          runs[f'torch {name}'] = torch_step(experts, top_k, name, x_nd, cotangent_nd)
      seconds = interleaved_medians(runs, warmup=1, repeats=FLAGS.repeats)
      rate = {name: FLAGS.tokens / value for name, value in seconds.items()}
      print(f'| {experts} | {top_k} | ' + ' | '.join(f'{rate[name]:,.0f}' for name in header)
            + f' | {rate["dropless"] / rate["dense"]:.2f}x |', flush=True)


if __name__ == '__main__':
  app.run(main)
