"""The LLaMA/Qwen-style causal decoder: embeddings -> N blocks -> final norm -> head.

Every architectural choice comes from a `ModelConfig`; see models/config.py. The head is the
LM head (logits over the vocabulary) or, with n_labels > 0, a score head (a reward model's
scalar at every position, of which a sequence's last token is the score).
"""

import jax
import jax.numpy as jnp
from flax import nnx

from lmlab.models.block import ATTENTIONS, PLACEMENTS, Block, identity
from lmlab.models.config import UNPACKED_PEFTS, ModelConfig
from lmlab.models.dense import Dense, matmul_last_axis
from lmlab.models.errors import ConfigError
from lmlab.models.normalization import make_norm
from lmlab.models.positions import make_position_encoding
from lmlab.models.sharding import BATCH, EMBED, LENGTH, VOCAB, constrain, initializer
from lmlab.models.stack import run_blocks, split_keys


class DecoderLM(nnx.Module):

  def __init__(self, config: ModelConfig, *, rngs: nnx.Rngs):
    config.buildable('decoder')
    self.config = config
    dtype, param_dtype = jnp.dtype(config.dtype), jnp.dtype(config.param_dtype)
    self.embed = nnx.Embed(config.vocab_size, config.d_model, dtype=dtype,
                           param_dtype=param_dtype, rngs=rngs,
                           embedding_init=initializer(nnx.initializers.normal(config.init_std),
                                                      (VOCAB, EMBED)))
    self.positions = make_position_encoding(config, dtype=dtype, param_dtype=param_dtype,
                                            rngs=rngs)
    self.blocks = nnx.List([Block(config, dtype=dtype, param_dtype=param_dtype, rngs=rngs,
                                  layer=i) for i in range(config.n_layers)])
    self.embed_norm = (make_norm(config.norm, config.d_model, eps=config.norm_eps, dtype=dtype,
                                 param_dtype=param_dtype) if config.embed_norm else identity)
    self.final_norm = (make_norm(config.norm, config.d_model, eps=config.norm_eps, dtype=dtype,
                                 param_dtype=param_dtype)
                       if PLACEMENTS[config.norm_placement].final_norm else identity)
    self.lm_head = (None if config.tie_embeddings or config.n_labels else
                    Dense(config.d_model, config.vocab_size, axes=(EMBED, VOCAB), use_bias=False,
                          init_std=config.init_std, dtype=dtype, param_dtype=param_dtype,
                          rngs=rngs))
    self.score = (Dense(config.d_model, config.n_labels, axes=(EMBED, None), use_bias=False,
                        init_std=config.init_std, dtype=dtype, param_dtype=param_dtype,
                        rngs=rngs) if config.n_labels else None)
    self.value_head = (Dense(config.d_model, 1, axes=(EMBED, None), use_bias=False,
                             init_std=0.0, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
                       if config.value_head else None)
    self.dropout = nnx.Dropout(config.dropout_rate)
    self.prompt = nnx.data(None)  # peft=prompt: a prompt_tuning.Prompt (registry.build adds it).
    # config.trainable_tokens: a trainable_tokens.TrainableTokens (registry.build adds it).
    self.token_rows = nnx.data(None)

  def __call__(self, tokens_bt, *, positions_bt=None, segment_ids_bt=None, prefix_len_b=None,
               attention_mask=None, dropout_key=None, with_values=False):
    """Logits [B, T, V] of the next token at every position (a scoring model's n_labels
    scores [B, T, L]); with_values: (logits, the value head's values [B, T]).

    positions_bt defaults to 0..T-1; with packed documents, pass each token's position in
    its document and the documents' segment_ids_bt so attention stops at their boundaries.
    attention_mask [B, T] (1 for tokens, 0 for padding, as Hugging Face models take it) is
    the shortcut for padded batches, left or right: positions count real tokens only and
    padding is a segment of its own. prefix_len_b [B] makes the first tokens of each row
    a bidirectional prefix (prefix-LM). Dropout is applied only when a dropout_key is given.
    A prompt-tuned model (peft=prompt) runs its virtual tokens first; see
    models/prompt_tuning.py. It and a prefix-tuned one take no packed rows.
    """
    t = tokens_bt.shape[1]
    n_virtual = self._n_virtual()
    self.config.check_positions(n_virtual + t, 'sequence length' + (
        f' plus {n_virtual} virtual tokens' if n_virtual else ''))
    if self.config.peft in UNPACKED_PEFTS and (segment_ids_bt is not None
                                               or prefix_len_b is not None):
      raise ConfigError(f'peft={self.config.peft} takes unpacked rows (attention_mask for '
                        'padding), not segment_ids_bt or prefix_len_b: its learned tokens '
                        'cannot lead every packed document (train the lm objective with '
                        '--document_masking=false)')
    if attention_mask is not None:
      if positions_bt is not None or segment_ids_bt is not None:
        raise ValueError('pass attention_mask or positions_bt/segment_ids_bt, not both')
      segment_ids_bt = jnp.asarray(attention_mask, jnp.int32)
      positions_bt = jnp.maximum(jnp.cumsum(segment_ids_bt, axis=1) - 1, 0)
    if positions_bt is None:
      positions_bt = jnp.broadcast_to(jnp.arange(t), tokens_bt.shape)
    x_btd = self._embed(tokens_bt)
    if self.prompt is not None:
      x_btd, positions_bt, segment_ids_bt = self.prompt.prepend(x_btd, positions_bt,
                                                                segment_ids_bt)
    hidden_btd, _ = self._forward(x_btd, positions_bt, segment_ids_bt=segment_ids_bt,
                                  prefix_len_b=prefix_len_b, caches=None, cache_index=None,
                                  dropout_key=dropout_key)
    hidden_btd = hidden_btd[:, n_virtual:]
    if with_values:
      return self.logits(hidden_btd), self.value_head(hidden_btd)[..., 0]
    return self.logits(hidden_btd)

  def _embed(self, tokens_bt):
    x_btd = self.embed(tokens_bt)
    return x_btd if self.token_rows is None else self.token_rows.embed(tokens_bt, x_btd)

  def _n_virtual(self) -> int:
    """Positions before the row's tokens: the virtual tokens of a prompt-tuned model."""
    return 0 if self.prompt is None else self.config.prompt_tokens

  def init_cache(self, batch: int, length: int):
    """A KV cache for `length` positions (prompt plus generated tokens), after the virtual
    tokens of a prompt-tuned model, which it holds already."""
    n_virtual = self._n_virtual()
    self.config.check_positions(n_virtual + length, 'prompt plus new tokens',
                                'ask for fewer tokens')
    _, empty_cache = ATTENTIONS[self.config.attention_type]
    caches = [empty_cache(self.config, batch, n_virtual + length, jnp.dtype(self.config.dtype))
              for _ in range(self.config.n_layers)]
    if self.prompt is None:
      return caches
    positions_by = jnp.broadcast_to(jnp.arange(n_virtual), (batch, n_virtual))
    return self._forward(self.prompt.embeddings(batch, jnp.dtype(self.config.dtype)),
                         positions_by, segment_ids_bt=None, prefix_len_b=None, caches=caches,
                         cache_index=0, dropout_key=None)[1]

  def decode(self, tokens_bt, caches, cache_index):
    """Runs tokens_bt at positions cache_index.. (after a prompt-tuned model's virtual tokens)
    against the cache; returns (logits, caches)."""
    t = tokens_bt.shape[1]
    cache_index = cache_index + self._n_virtual()
    positions_bt = jnp.broadcast_to(cache_index + jnp.arange(t), tokens_bt.shape)
    hidden_btd, caches = self._forward(self._embed(tokens_bt), positions_bt, segment_ids_bt=None,
                                       prefix_len_b=None, caches=caches,
                                       cache_index=cache_index, dropout_key=None)
    return self.logits(hidden_btd), caches

  def _forward(self, x_btd, positions_bt, *, segment_ids_bt, prefix_len_b, caches,
               cache_index, dropout_key):
    """The final norm's output [B, T, D] of the token embeddings x_btd, and the caches."""
    n_layers = self.config.n_layers
    keys = split_keys(dropout_key, n_layers + 1)
    x_btd = self.embed_norm(self.positions.embed(x_btd, positions_bt))
    x_btd = constrain(x_btd, (BATCH, LENGTH, None))
    x_btd = self.dropout(x_btd, deterministic=dropout_key is None, rngs=keys[n_layers])
    rotate = self.positions.rotation(positions_bt)
    mask = dict(alibi_slopes=self.positions.alibi_slopes(), segment_ids_bt=segment_ids_bt,
                prefix_len_b=prefix_len_b)
    if self.config.dca_chunk_size:
      mask['positions_bt'] = positions_bt  # Dual chunk attention maps them itself.
    x_btd, new_caches, _ = run_blocks(self.blocks, x_btd, rotate, mask, dropout_keys=keys,
                                      remat=self.config.remat, caches=caches,
                                      cache_index=cache_index)
    return self.final_norm(x_btd), new_caches

  def logits(self, x_btd):
    """The output head: x times the output embedding (the input one when tied), whose rows
    are normalised to unit length first with the NormHead of Baichuan 2; or the score head."""
    if self.score is not None:
      return self.score(x_btd)
    if self.lm_head is None:
      w_dv = self.embed.embedding[...].T
    else:
      w_dv = self.lm_head.weight()
    w_dv = w_dv.astype(x_btd.dtype)
    if self.token_rows is not None:
      w_dv = self.token_rows.head(w_dv)
    if self.config.head == 'normhead':
      w32_dv = w_dv.astype(jnp.float32)
      w_dv = (w32_dv * jax.lax.rsqrt(jnp.sum(w32_dv * w32_dv, axis=0, keepdims=True)
                                     + 1e-12)).astype(x_btd.dtype)
    return constrain(matmul_last_axis(x_btd, w_dv), (BATCH, LENGTH, VOCAB))
