"""A stack of Blocks run in order, shared by the decoder, the BERT encoder and the
encoder-decoder: per-layer dropout keys, rematerialisation, KV caches, cross-attention
memories, and every layer's output for models that return hidden states."""
import jax
from flax import nnx

# What each ModelConfig.remat keeps for the backward pass (nothing else is recomputed).
REMAT_POLICIES = {'full': None,
                  'matmuls': jax.checkpoint_policies.dots_with_no_batch_dims_saveable}


def split_keys(dropout_key, n: int):
  """n independent keys from dropout_key, or n Nones without one (no dropout)."""
  return list(jax.random.split(dropout_key, n)) if dropout_key is not None else [None] * n


def run_blocks(blocks, x_btd, rotate, mask, *, dropout_keys, remat='none', caches=None,
               cache_index=None, memories=None):
  """Runs x_btd through `blocks`.

  mask holds the attention's mask arguments (see Block.__call__); dropout_keys has one
  entry per block; remat, a ModelConfig.remat policy, applies to training only; caches,
  when decoding, one KV cache per block; memories, for blocks with cross-attention, each
  block's encoder memory.
  Returns (x_btd, the updated caches or None, [the input, then each block's output]).
  """
  outputs, new_caches = [x_btd], []
  for i, block in enumerate(blocks):
    memory = None if memories is None else memories[i]
    if caches is None and remat != 'none':
      x_btd = nnx.remat(lambda blk, x, mask, memory, key: blk(
          x, rotate, memory=memory, dropout_key=key, **mask)[0],
                        policy=REMAT_POLICIES[remat])(block, x_btd, mask, memory,
                                                      dropout_keys[i])
    else:
      x_btd, cache = block(x_btd, rotate, cache=None if caches is None else caches[i],
                           cache_index=cache_index, dropout_key=dropout_keys[i],
                           memory=memory, **mask)
      new_caches.append(cache)
    outputs.append(x_btd)
  return x_btd, (new_caches if caches is not None else None), outputs
