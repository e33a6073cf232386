"""Measurements the training loop does not log, taken on a model's parameters.

  gradient_norms   layer-by-layer gradient norms of chosen weights on one batch (Xiong et al.
                   2020, figure 3, show those of the FFN's output matrix at initialisation)
  attention_stats  entropy and saturation of every softmax row, from an eager forward pass
  head_similarity  how alike the heads of one projection are (symmetry of an initialisation)
  decode_speed     prefill time and decode tokens/s of the jitted generation with a KV cache
"""
import contextlib
import functools
import math
import re
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from lmlab.kernels import attention as attention_lib
from lmlab.kernels import masks
from lmlab.models.generation import SamplingConfig, make_generate
from lmlab.training.steps import batch_loss


def path_name(key_path) -> str:
  """A parameter's pytree key path as 'blocks/0/mlp/down/kernel'."""
  names = (str(getattr(key, 'key', getattr(key, 'name', key))) for key in key_path)
  return '/'.join(name for name in names if name != 'value')


def named_leaves(tree):
  """(path name, array) of every leaf of a parameter state."""
  for key_path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]:
    yield path_name(key_path), leaf


def gradient_norms(graphdef, params, batch, weights: dict[str, str]) -> dict[str, list[float]]:
  """{name: [gradient norm of layer 0, 1, ...]} of the loss on `batch`, where each name's
  regex picks parameters by their path inside a block (e.g. 'mlp/down/kernel')."""
  grads = jax.jit(jax.grad(functools.partial(batch_loss, graphdef)))(params, batch)
  squares = {name: {} for name in weights}
  for path, grad in named_leaves(grads):
    for name, pattern in weights.items():
      match = re.fullmatch(rf'blocks/(\d+)/(?:{pattern})', path)
      if match:
        layer = int(match[1])
        squares[name][layer] = squares[name].get(layer, 0.0) + float(jnp.sum(jnp.square(grad)))
  for name, by_layer in squares.items():
    if not by_layer:
      raise ValueError(f'no block parameter matches {weights[name]!r}')
  return {name: [math.sqrt(by_layer[i]) for i in sorted(by_layer)]
          for name, by_layer in squares.items()}


@contextlib.contextmanager
def _recorded_attention():
  """Records q, k and the mask arguments of every attention_lib.attention call meanwhile.

  The attention modules call attention_lib.attention through the package, so swapping that one
  attribute sees every layer without a second model implementation. The records are real
  arrays only in an eager (not jitted) forward pass.
  """
  calls = []
  original = attention_lib.attention

  def recording(q, k, v, **kwargs):
    calls.append((q, k, kwargs))
    return original(q, k, v, **kwargs)

  attention_lib.attention = recording
  try:
    yield calls
  finally:
    attention_lib.attention = original


def _probabilities(q_bthd, k_bskd, kwargs):
  """(softmax rows [B, H, T, S], visible keys [B, 1, T, S]) of one recorded call, with the
  mask semantics of docs/DESIGN.md."""
  b, t, n_heads, head_dim = q_bthd.shape
  s = k_bskd.shape[1]
  k_bshd = jnp.repeat(k_bskd, n_heads // k_bskd.shape[2], axis=2)
  scale = kwargs.get('scale') or head_dim ** -0.5
  scores = jnp.einsum('bthd,bshd->bhts', q_bthd.astype(jnp.float32),
                      k_bshd.astype(jnp.float32)) * scale
  q_pos, k_pos = kwargs.get('q_offset', 0) + jnp.arange(t), jnp.arange(s)
  q_segment, kv_segment = kwargs.get('segment_ids') or (None, None)
  causal = kwargs.get('causal', False)
  visible = masks.visible(q_pos, k_pos, causal=causal,
                          sliding_window=kwargs.get('sliding_window'),
                          prefix_len=kwargs.get('prefix_len'), q_segment=q_segment,
                          kv_segment=kv_segment)[:, None]
  if kwargs.get('alibi_slopes') is not None:
    scores = scores + masks.alibi_bias(kwargs['alibi_slopes'], q_pos, k_pos, causal=causal)
  return jax.nn.softmax(jnp.where(visible, scores, -jnp.inf), axis=-1), visible


def attention_stats(graphdef, params, batch, *, saturated_above: float = 0.9,
                    min_keys: int = 8) -> dict:
  """Softmax statistics of every layer on `batch`, averaged over layers.

  entropy: a row's entropy over log(number of keys it sees), so 1 is uniform attention and
  0 one-hot (rows that see one key are left out). saturated: the share of rows that see at
  least min_keys keys and put more than saturated_above of their weight on one.
  """
  model = nnx.merge(graphdef, params)
  with _recorded_attention() as calls:
    model(batch['inputs'], positions_bt=batch.get('positions'),
          segment_ids_bt=batch.get('segment_ids'))
  entropy, saturated = [], []
  for q_bthd, k_bskd, kwargs in calls:
    probs, visible = _probabilities(q_bthd, k_bskd, kwargs)
    n_keys = jnp.broadcast_to(visible.sum(-1), probs.shape[:-1])
    row_entropy = -jnp.sum(jnp.where(probs > 0, probs * jnp.log(probs), 0.0), axis=-1)
    several = n_keys >= 2
    entropy.append(float(jnp.sum(jnp.where(several, row_entropy / jnp.log(jnp.maximum(
        n_keys, 2)), 0.0)) / jnp.sum(several)))
    many = n_keys >= min_keys
    saturated.append(float(jnp.sum(many & (probs.max(-1) > saturated_above)) /
                           jnp.maximum(jnp.sum(many), 1)))
  return {'entropy': statistics.mean(entropy), 'saturated': statistics.mean(saturated),
          'entropy_per_layer': entropy}


def head_similarity(params, projection: str, n_heads: int) -> float:
  """Mean cosine similarity between different heads' columns of a projection (e.g. q_proj),
  over layers: about 0 for a random initialisation, 1 when every head is the same; NaN when
  the weights are all zero."""
  similarities = []
  for path, kernel in named_leaves(params):
    if re.fullmatch(rf'blocks/\d+/attention/{projection}/kernel', path):
      heads_hx = np.asarray(kernel, np.float64).reshape(kernel.shape[0], n_heads, -1)
      heads_hx = heads_hx.transpose(1, 0, 2).reshape(n_heads, -1)
      norms = np.linalg.norm(heads_hx, axis=1)
      if not norms.all():
        return math.nan
      cosines = (heads_hx @ heads_hx.T) / np.outer(norms, norms)
      similarities.append(cosines[~np.eye(n_heads, dtype=bool)].mean())
  return float(np.mean(similarities))


def decode_speed(graphdef, params, vocab_size: int, *, batch: int, prompt_len: int,
                 new_tokens: int, repeats: int = 3):
  """(prefill milliseconds, decode tokens/s) of models.generation.make_generate, greedy and
  never stopping early: prefill is a call that makes one token, decode the extra time of a
  call that makes new_tokens, per token. Each time is the median of `repeats` after a warm-up.
  """
  prompt_bt = jnp.asarray(np.random.default_rng(0).integers(0, vocab_size, (batch, prompt_len)),
                          jnp.int32)
  key = jax.random.key(0)

  def seconds(n_new):
    generate = make_generate(graphdef, SamplingConfig(max_new_tokens=n_new, temperature=0.0),
                             end_token=vocab_size, n_valid=vocab_size)
    jax.block_until_ready(generate(params, prompt_bt, key))
    times = []
    for _ in range(repeats):
      start = time.perf_counter()
      jax.block_until_ready(generate(params, prompt_bt, key))
      times.append(time.perf_counter() - start)
    return statistics.median(times)

  prefill, full = seconds(1), seconds(new_tokens)
  return 1e3 * prefill, batch * (new_tokens - 1) / max(full - prefill, 1e-9)
