"""The memory a training step or decoding needs per device, from the config alone
(`--mode=memory`): no array is allocated.

Notation: P parameters, P_t of them trained (all, or a LoRA run's adapters); b_p the bytes of
param_dtype, b_c of dtype (compute); S = fsdp x tensor, the ways the parameters are split
(models/sharding.py's default rules); W = data x fsdp x expert, the ways the batch is split;
T = tensor; N = micro-batch x seq_len / W tokens per device; L layers, d = d_model,
f = ffn_dim, d_q = n_heads x head_dim, d_kv = n_kv_heads x head_dim, V = vocab_size.

  parameters    P b_p / S
  optimizer     2 P_t b_p / S     AdamW's two moments, in the parameters' dtype (optax's)
  gradients     2 P_t b_p / S     the gradients and the update made from them: no parameter
                                  changes before all gradients exist (the clipping norm spans
                                  them), so both are whole at the end of the step
  activations   N (L a + h)       what the backward pass reads, where per token
      a = (7 d + (4 d_q + 4 d_kv + m f) / T) b_c      for each layer:
          7 d: the residual stream into each of the two norms, its normalised output before
               and after the gain, and the block's output;
          4 d_q + 4 d_kv: q, k, v and the attention output, each as projected and in the
               heads-first layout the attention kernel reads;
          m f: a gated MLP (swiglu, geglu) keeps the gate, the up projection, the
               activation's input and output and their product (m = 5); gelu its
               pre-activation, its output and the two factors of its derivative (m = 4);
               relu its pre-activation and output (m = 2)
      h = V b_c + 4 V + 4 d b_c: the logits, their float32 softmax for the loss, the final
          norm's three tensors and the embeddings
      remat=full keeps each block's input only, and recomputes one block at a time:
          L a becomes L d b_c + a
      remat=matmuls keeps the projections' outputs (and recomputes norms and activations):
          L a becomes L (2 d + (d_q + 2 d_kv + g f) / T) b_c + a, g = 2 gated, 1 plain
  training peak = parameters + optimizer + max(activations, gradients): in the backward pass
                  activations are freed as gradients appear, so the transient is the larger
                  of the two ends of that exchange
  inference     = parameters + KV cache + one layer's and the logits' activations of the
                  prefill, where the KV cache is 2 L d_kv (batch x seq_len) b_c / (T W)
                  (with kv_cache_dtype=int8, d_kv + 4 n_kv bytes in place of d_kv b_c)

Checked against XLA's memory_analysis() of the compiled train step in tests/test_memory.py.
On XLA:CPU remat saves about a tenth (121 -> 108 MB at 8 layers of d_model 128), not what
it saves elsewhere: the CPU scheduler runs the recomputation early, so only remat=none is
checked there.
"""
import dataclasses
import math

import jax.numpy as jnp
from flax import nnx

from lmlab.models.cache_size import kv_cache_bytes_per_token
from lmlab.models.config import ModelConfig
from lmlab.models.errors import ConfigError
from lmlab.models.mlp import GATED
from lmlab.models.registry import abstract_model, param_count, trainable
from lmlab.training import parallel

USES = ('train', 'inference')
PARTS = ('parameters', 'optimizer', 'gradients', 'activations', 'kv_cache')
# m: the tensors of ffn_dim units an MLP keeps for its backward pass (module docstring).
MLP_TENSORS = {'swiglu': 5, 'geglu': 5, 'gelu': 4, 'gelu_tanh': 4, 'relu': 2}


def _check_covered(config: ModelConfig):
  uncovered = {'family': config.family != 'decoder', 'attention_type': config.attention_type
               != 'mha', 'moe_experts': config.moe_experts > 0, 'quantize': bool(config.quantize),
               'lora_quantize': bool(config.lora_quantize),
               'peft': config.peft not in ('', 'lora')}
  named = [name for name, bad in uncovered.items() if bad]
  if named:
    raise ConfigError(f'--mode=memory estimates dense decoders with MHA/GQA attention, trained '
                      f'in full or with LoRA; {named[0]}={getattr(config, named[0])!r} is not '
                      'covered')


def _trained_params(config: ModelConfig) -> int:
  selected = trainable(config)
  if selected is None:
    return param_count(config)
  return sum(leaf.size for _, leaf in nnx.to_flat_state(
      nnx.state(abstract_model(config), selected)))


def per_layer_activations(config: ModelConfig, tensor: int) -> dict:
  """Bytes per token of one layer under each remat policy: (kept, recomputed block)."""
  head_dim = config.head_dim or config.d_model // config.n_heads
  d, d_q, d_kv = config.d_model, config.n_heads * head_dim, config.n_kv_heads * head_dim
  gated = config.mlp in GATED
  b_c = jnp.dtype(config.dtype).itemsize
  block = (7 * d + (4 * d_q + 4 * d_kv + MLP_TENSORS[config.mlp] * config.ffn_dim) / tensor) * b_c
  kept = {'none': block, 'full': d * b_c,
          'matmuls': (2 * d + (d_q + 2 * d_kv + (2 if gated else 1) * config.ffn_dim) / tensor)
          * b_c}[config.remat]
  return {'kept': kept, 'recomputed': 0.0 if config.remat == 'none' else block}


def estimate(config: ModelConfig, *, batch_size: int, seq_len: int, mesh: str,
             n_devices: int, use: str = 'train') -> dict:
  """Bytes per device of each of PARTS and their 'total' (see the module docstring);
  batch_size is the micro-batch, all devices together."""
  config.validate()
  _check_covered(config)
  if use not in USES:
    raise ConfigError(f'--memory_use={use!r} is not one of {", ".join(USES)}')
  axes = parallel.mesh_shape(mesh, n_devices)
  shards, batch_ways = axes['fsdp'] * axes['tensor'], axes['data'] * axes['fsdp'] * axes['expert']
  if batch_size % batch_ways:
    raise ConfigError(f'a batch of {batch_size} does not split over the {batch_ways} devices '
                      f'of the batch axes of --mesh={mesh}')
  b_p, b_c = jnp.dtype(config.param_dtype).itemsize, jnp.dtype(config.dtype).itemsize
  tokens = batch_size * seq_len / batch_ways
  parameters = param_count(config) * b_p / shards
  layer = per_layer_activations(dataclasses.replace(config, remat='none' if use == 'inference'
                                                    else config.remat), axes['tensor'])
  head = config.vocab_size * (b_c + 4) + 4 * config.d_model * b_c
  if use == 'inference':
    kv_cache = kv_cache_bytes_per_token(config) * tokens / axes['tensor']
    activations = tokens * (layer['kept'] + config.vocab_size * b_c)
    sizes = dict(parameters=parameters, optimizer=0.0, gradients=0.0, activations=activations,
                 kv_cache=kv_cache)
    return {**sizes, 'total': sum(sizes.values())}
  trained = _trained_params(config) * b_p / shards
  activations = tokens * (config.n_layers * layer['kept'] + layer['recomputed'] + head)
  sizes = dict(parameters=parameters, optimizer=2 * trained, gradients=2 * trained,
               activations=activations, kv_cache=0.0)
  total = parameters + sizes['optimizer'] + max(activations, sizes['gradients'])
  return {**sizes, 'total': total}


def mesh_devices(mesh: str, available: int) -> int:
  """The devices a --mesh names: the product of its sizes, or `available` where one is -1."""
  sizes = [part.partition(':')[2] for part in mesh.split(',') if part.strip()]
  if '-1' in sizes or not all(size.isdigit() for size in sizes):
    return available
  return math.prod(map(int, sizes))


def table(rows: dict) -> str:
  """A markdown table of {label: estimate()}, in GiB (MiB where every total is below 1 GiB)."""
  unit, scale = ('GiB', 2**30) if max(s['total'] for s in rows.values()) >= 2**30 else ('MiB',
                                                                                        2**20)
  lines = [f'| setting ({unit} per device) | ' + ' | '.join(PARTS) + ' | total |',
           '|---' * (len(PARTS) + 2) + '|']
  for label, sizes in rows.items():
    cells = [f'{sizes[name] / scale:,.2f}' for name in (*PARTS, 'total')]
    lines.append(f'| {label} | ' + ' | '.join(cells) + ' |')
  return '\n'.join(lines)


def compiled_bytes(compiled) -> int:
  """Bytes a compiled program needs per device by XLA's memory_analysis(): arguments,
  temporaries and outputs, less the outputs aliased to (donated) arguments."""
  stats = compiled.memory_analysis()
  return (stats.argument_size_in_bytes + stats.temp_size_in_bytes + stats.output_size_in_bytes
          - stats.alias_size_in_bytes)
