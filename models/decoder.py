"""The LLaMA/Qwen-style causal decoder: embeddings -> N blocks -> final norm -> head.

Every architectural choice comes from a `ModelConfig`; see models/config.py.
"""

import jax
import jax.numpy as jnp
from flax import nnx

from models.attention import empty_kv_cache
from models.block import PLACEMENTS, Block, identity
from models.config import ConfigError, ModelConfig
from models.dense import Dense, matmul_last_axis
from models.normalization import make_norm
from models.positions import make_position_encoding


class DecoderLM(nnx.Module):

  def __init__(self, config: ModelConfig, *, rngs: nnx.Rngs):
    config.validate()
    if not config.vocab_size:
      raise ConfigError('vocab_size=0 (take it from the tokenizer) must be resolved before a '
                        'model is built; see training.loop.resolve_vocab')
    self.config = config
    dtype, param_dtype = jnp.dtype(config.dtype), jnp.dtype(config.param_dtype)
    self.embed = nnx.Embed(config.vocab_size, config.d_model, dtype=dtype,
                           param_dtype=param_dtype,
                           embedding_init=nnx.initializers.normal(config.init_std), rngs=rngs)
    self.positions = make_position_encoding(config, dtype=dtype, param_dtype=param_dtype,
                                            rngs=rngs)
    self.blocks = nnx.List([Block(config, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
                            for _ in range(config.n_layers)])
    self.final_norm = (make_norm(config.norm, config.d_model, eps=config.norm_eps, dtype=dtype,
                                 param_dtype=param_dtype)
                       if PLACEMENTS[config.norm_placement].final_norm else identity)
    self.lm_head = (None if config.tie_embeddings else
                    Dense(config.d_model, config.vocab_size, use_bias=False,
                          init_std=config.init_std, dtype=dtype, param_dtype=param_dtype,
                          rngs=rngs))
    self.dropout = nnx.Dropout(config.dropout_rate)

  def __call__(self, tokens_bt, *, positions_bt=None, segment_ids_bt=None, dropout_key=None):
    """Logits [B, T, V] of the next token at every position.

    positions_bt defaults to 0..T-1; with packed documents, pass each token's position in
    its document and the documents' segment_ids_bt so attention stops at their boundaries.
    Dropout is applied only when a dropout_key is given.
    """
    t = tokens_bt.shape[1]
    if self.config.position == 'learned' and t > self.config.max_seq_len:
      raise ConfigError(f'sequence length {t} exceeds the learned position table '
                        f'(max_seq_len={self.config.max_seq_len})')
    if positions_bt is None:
      positions_bt = jnp.broadcast_to(jnp.arange(t), tokens_bt.shape)
    logits, _ = self._forward(tokens_bt, positions_bt, segment_ids_bt=segment_ids_bt,
                              caches=None, cache_index=None, dropout_key=dropout_key)
    return logits

  def init_cache(self, batch: int, length: int):
    """An empty KV cache for `length` positions (prompt plus generated tokens)."""
    if self.config.position == 'learned' and length > self.config.max_seq_len:
      raise ConfigError(f'{length} positions exceed the learned position table '
                        f'(max_seq_len={self.config.max_seq_len}); ask for fewer tokens')
    return [empty_kv_cache(self.config, batch, length, jnp.dtype(self.config.dtype))
            for _ in range(self.config.n_layers)]

  def decode(self, tokens_bt, caches, cache_index):
    """Runs tokens_bt at positions cache_index.. against the cache; returns (logits, caches)."""
    t = tokens_bt.shape[1]
    positions_bt = jnp.broadcast_to(cache_index + jnp.arange(t), tokens_bt.shape)
    return self._forward(tokens_bt, positions_bt, segment_ids_bt=None, caches=caches,
                         cache_index=cache_index, dropout_key=None)

  def _forward(self, tokens_bt, positions_bt, *, segment_ids_bt, caches, cache_index,
               dropout_key):
    n_layers = self.config.n_layers
    keys = (jax.random.split(dropout_key, n_layers + 1) if dropout_key is not None
            else [None] * (n_layers + 1))
    x_btd = self.positions.embed(self.embed(tokens_bt), positions_bt)
    x_btd = self.dropout(x_btd, deterministic=dropout_key is None, rngs=keys[n_layers])
    rotate = self.positions.rotation(positions_bt)
    slopes = self.positions.alibi_slopes()
    new_caches = []
    for i, block in enumerate(self.blocks):
      if caches is None and self.config.remat:
        x_btd = nnx.remat(lambda blk, x, segments, key: blk(
            x, rotate, alibi_slopes=slopes, segment_ids_bt=segments, dropout_key=key)[0])(
                block, x_btd, segment_ids_bt, keys[i])
      else:
        x_btd, cache = block(x_btd, rotate, alibi_slopes=slopes, segment_ids_bt=segment_ids_bt,
                             cache=None if caches is None else caches[i],
                             cache_index=cache_index, dropout_key=keys[i])
        new_caches.append(cache)
    x_btd = self.final_norm(x_btd)
    if self.lm_head is None:
      logits_btv = matmul_last_axis(x_btd, self.embed.embedding[...].astype(x_btd.dtype).T)
    else:
      logits_btv = self.lm_head(x_btd)
    return logits_btv, (new_caches if caches is not None else None)


def param_count(config: ModelConfig) -> int:
  """Number of parameters, from shapes alone (nothing is allocated)."""
  abstract = nnx.eval_shape(lambda: DecoderLM(config, rngs=nnx.Rngs(0)))
  return sum(leaf.size for leaf in jax.tree.leaves(nnx.state(abstract, nnx.Param)))
