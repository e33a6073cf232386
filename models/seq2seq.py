"""The encoder-decoder Transformer of Vaswani et al. 2017, from the spine's blocks.

  model = build(dataclasses.replace(preset('transformer-tiny'), vocab_size=64),
                rngs=nnx.Rngs(0))
  logits_btv = model(source_bs, source_mask_bs, decoder_inputs_bt)     # teacher forcing
  beam_search = make_beam_search(graphdef, max_len=32, bos=1, eos=2, n_valid=64, beam_size=4)
  tokens_bl = beam_search(params, source_bs, source_mask_bs)           # jitted; make_greedy

The encoder's blocks attend both ways (padding hidden by the source mask); the decoder's
blocks attend causally to the target, then cross-attend to the encoder output, then run
the MLP, each sublayer under the config's norm placement (the presets: post-LN, ReLU,
sinusoidal positions, embeddings times sqrt(d_model)). With tie_embeddings one table
embeds source and target and makes the output logits. Training: training/seq2seq.py.
"""
import dataclasses

import jax
import jax.numpy as jnp
from flax import nnx

from lmlab.models import kv_cache
from lmlab.models.block import PLACEMENTS, Block, identity
from lmlab.models.config import ModelConfig
from lmlab.models.dense import Dense, matmul_last_axis
from lmlab.models.normalization import make_norm
from lmlab.models.positions import make_position_encoding
from lmlab.models.sharding import EMBED, VOCAB, initializer
from lmlab.models.stack import run_blocks, split_keys


class EncoderDecoder(nnx.Module):

  def __init__(self, config: ModelConfig, *, rngs: nnx.Rngs):
    config.buildable('encoder_decoder')
    self.config = config
    dtype, param_dtype = jnp.dtype(config.dtype), jnp.dtype(config.param_dtype)
    d = config.d_model

    def embedding():
      return nnx.Embed(config.vocab_size, d, dtype=dtype, param_dtype=param_dtype, rngs=rngs,
                       embedding_init=initializer(nnx.initializers.normal(config.init_std),
                                                  (VOCAB, EMBED)))

    def final_norm():
      return (make_norm(config.norm, d, eps=config.norm_eps, dtype=dtype,
                        param_dtype=param_dtype)
              if PLACEMENTS[config.norm_placement].final_norm else identity)

    self.embed = embedding()  # the target's, and with tie_embeddings the source's and output's
    self.source_embed = None if config.tie_embeddings else embedding()
    self.lm_head = (None if config.tie_embeddings else
                    Dense(d, config.vocab_size, axes=(EMBED, VOCAB), use_bias=False,
                          init_std=config.init_std, dtype=dtype, param_dtype=param_dtype,
                          rngs=rngs))
    self.positions = make_position_encoding(config, dtype=dtype, param_dtype=param_dtype,
                                            rngs=rngs)
    encoder_config = dataclasses.replace(config, causal=False)
    self.encoder_blocks = nnx.List([
        Block(encoder_config, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        for _ in range(config.n_layers)])
    self.decoder_blocks = nnx.List([
        Block(config, dtype=dtype, param_dtype=param_dtype, rngs=rngs, cross_attention=True)
        for _ in range(config.decoder_layers)])
    self.encoder_norm, self.decoder_norm = final_norm(), final_norm()
    self.dropout = nnx.Dropout(config.dropout_rate)
    self.embed_scale = d ** 0.5 if config.embed_scale else 1.0

  def _embed(self, table, tokens_bt, positions_bt, dropout_key):
    x_btd = self.positions.embed(table(tokens_bt) * self.embed_scale, positions_bt)
    return (self.dropout(x_btd, deterministic=dropout_key is None, rngs=dropout_key),
            self.positions.rotation(positions_bt))

  def encode(self, source_bs, source_mask_bs, *, dropout_key=None):
    """The encoder output [B, S, D]; padding (source_mask 0) is never attended to."""
    self.config.check_positions(source_bs.shape[1], 'source length')
    keys = split_keys(dropout_key, self.config.n_layers + 1)
    positions_bs = jnp.broadcast_to(jnp.arange(source_bs.shape[1]), source_bs.shape)
    table = self.embed if self.source_embed is None else self.source_embed
    x_bsd, rotate = self._embed(table, source_bs, positions_bs, keys[-1])
    mask = dict(alibi_slopes=self.positions.alibi_slopes(),
                segment_ids_bt=jnp.asarray(source_mask_bs, jnp.int32))
    x_bsd, _, _ = run_blocks(self.encoder_blocks, x_bsd, rotate, mask, dropout_keys=keys,
                             remat=self.config.remat)
    return self.encoder_norm(x_bsd)

  def memories(self, encoded_bsd, source_mask_bs):
    """Each decoder layer's cross-attention keys and values, computed once per source."""
    return [block.cross_attention.memory(encoded_bsd, source_mask_bs)
            for block in self.decoder_blocks]

  def init_cache(self, batch: int, length: int):
    """An empty self-attention KV cache per decoder layer for `length` target positions."""
    self.config.check_positions(length, 'target length')
    return [kv_cache.empty(self.config, batch, length, jnp.dtype(self.config.dtype))
            for _ in range(self.config.decoder_layers)]

  def decode(self, target_bt, memories, *, caches=None, cache_index=0, dropout_key=None):
    """Logits [B, T, V] of the next target token after each of target_bt, which sits at
    positions cache_index..; with caches (init_cache), also the updated caches."""
    self.config.check_positions(target_bt.shape[1], 'target length')
    keys = split_keys(dropout_key, self.config.decoder_layers + 1)
    positions_bt = jnp.broadcast_to(cache_index + jnp.arange(target_bt.shape[1]),
                                    target_bt.shape)
    x_btd, rotate = self._embed(self.embed, target_bt, positions_bt, keys[-1])
    x_btd, caches, _ = run_blocks(
        self.decoder_blocks, x_btd, rotate, dict(alibi_slopes=self.positions.alibi_slopes()),
        dropout_keys=keys, remat=self.config.remat, caches=caches, cache_index=cache_index,
        memories=memories)
    x_btd = self.decoder_norm(x_btd)
    w_dv = self.embed.embedding[...].T if self.lm_head is None else self.lm_head.kernel[...]
    return matmul_last_axis(x_btd, w_dv.astype(x_btd.dtype)), caches

  def __call__(self, source_bs, source_mask_bs, decoder_inputs_bt, *, dropout_key=None):
    """Teacher forcing: logits [B, T, V] of the target after each decoder input."""
    encoder_key, decoder_key = split_keys(dropout_key, 2)
    encoded_bsd = self.encode(source_bs, source_mask_bs, dropout_key=encoder_key)
    logits_btv, _ = self.decode(decoder_inputs_bt, self.memories(encoded_bsd, source_mask_bs),
                                dropout_key=decoder_key)
    return logits_btv


def length_penalty(length, alpha: float):
  """Wu et al. 2016: ((5 + length) / 6) ** alpha; a hypothesis scores log P / penalty."""
  return ((5.0 + length) / 6.0) ** alpha


def _start(model, source_bs, source_mask_bs, *, copies: int, max_len: int):
  """Each decoder layer's source memory, repeated `copies` times per row (one per beam),
  and empty self-attention caches for as many rows."""
  memories = model.memories(model.encode(source_bs, source_mask_bs), source_mask_bs)
  memories = jax.tree.map(lambda m: jnp.repeat(m, copies, axis=0), memories)
  return memories, model.init_cache(source_bs.shape[0] * copies, max_len)


def _log_probs(model, logits_b1v, n_valid: int):
  """log softmax over the ids below n_valid (the others get -inf), in float32."""
  valid_v = jnp.arange(model.config.vocab_size) < n_valid
  return jax.nn.log_softmax(jnp.where(valid_v, logits_b1v[:, 0].astype(jnp.float32), -jnp.inf))


def make_greedy(graphdef, *, max_len: int, bos: int, eos: int, n_valid: int):
  """greedy(params, source_bs, source_mask_bs) -> tokens [B, max_len], jitted.

  Decoding starts from `bos`, runs the encoder once, computes each layer's cross-attention
  keys and values once and caches the self-attention's; each step takes the likeliest id
  below n_valid. After `eos` a row holds eos.
  """

  @jax.jit
  def greedy(params, source_bs, source_mask_bs):
    model = nnx.merge(graphdef, params)
    b = source_bs.shape[0]
    memories, caches = _start(model, source_bs, source_mask_bs, copies=1, max_len=max_len)

    def step(i, carry):
      tokens_bl, caches, done_b = carry
      previous_b = jnp.where(i == 0, bos, tokens_bl[:, jnp.maximum(i - 1, 0)])
      logits, caches = model.decode(previous_b[:, None], memories, caches=caches,
                                    cache_index=i)
      token_b = jnp.where(done_b, eos, jnp.argmax(_log_probs(model, logits, n_valid), axis=-1))
      return tokens_bl.at[:, i].set(token_b), caches, done_b | (token_b == eos)

    carry = (jnp.full((b, max_len), eos, jnp.int32), caches, jnp.zeros(b, bool))
    return jax.lax.fori_loop(0, max_len, step, carry)[0]

  return greedy


def make_beam_search(graphdef, *, max_len: int, bos: int, eos: int, n_valid: int,
                     beam_size: int, alpha: float = 0.6):
  """beam_search(params, source_bs, source_mask_bs) -> tokens [B, max_len], jitted.

  Keeps the beam_size best hypotheses of each row by log P / length_penalty(length, alpha);
  a finished hypothesis (it produced eos) keeps its score and length. Returns the best, eos
  after its end. Caches and memories as make_greedy's, one row per hypothesis.
  """

  @jax.jit
  def beam_search(params, source_bs, source_mask_bs):
    model = nnx.merge(graphdef, params)
    b, w = source_bs.shape[0], beam_size
    memories, caches = _start(model, source_bs, source_mask_bs, copies=w, max_len=max_len)
    is_eos_v = jnp.arange(model.config.vocab_size) == eos

    def step(i, carry):
      tokens_bwl, scores_bw, lengths_bw, finished_bw, caches = carry
      previous = jnp.where(i == 0, bos, tokens_bwl[:, :, jnp.maximum(i - 1, 0)])
      logits, caches = model.decode(previous.reshape(b * w, 1), memories, caches=caches,
                                    cache_index=i)
      logp_bwv = _log_probs(model, logits, n_valid).reshape(b, w, -1)
      # A finished hypothesis continues with eos at no cost; the others with any token.
      candidates_bwv = jnp.where(finished_bw[..., None],
                                 jnp.where(is_eos_v, scores_bw[..., None], -jnp.inf),
                                 scores_bw[..., None] + logp_bwv)
      new_lengths_bw = jnp.where(finished_bw, lengths_bw, i + 1)
      ranked_bwv = candidates_bwv / length_penalty(new_lengths_bw, alpha)[..., None]
      _, best_bw = jax.lax.top_k(ranked_bwv.reshape(b, -1), w)
      parent_bw, token_bw = best_bw // logp_bwv.shape[-1], best_bw % logp_bwv.shape[-1]

      def by_parent(x):
        return jnp.take_along_axis(x, parent_bw.reshape(b, w, *([1] * (x.ndim - 2))), axis=1)

      tokens_bwl = by_parent(tokens_bwl).at[:, :, i].set(token_bw)
      scores_bw = jnp.take_along_axis(candidates_bwv.reshape(b, -1), best_bw, axis=1)
      lengths_bw = by_parent(new_lengths_bw)
      finished_bw = by_parent(finished_bw) | (token_bw == eos)
      caches = jax.tree.map(
          lambda c: by_parent(c.reshape(b, w, *c.shape[1:])).reshape(c.shape), caches)
      return tokens_bwl, scores_bw, lengths_bw, finished_bw, caches

    # The beams start equal; all but the first start at -inf, so step 0 expands one.
    scores_bw = jnp.broadcast_to(jnp.where(jnp.arange(w) == 0, 0.0, -jnp.inf), (b, w))
    carry = (jnp.full((b, w, max_len), eos, jnp.int32), scores_bw,
             jnp.zeros((b, w), jnp.int32), jnp.zeros((b, w), bool), caches)
    tokens_bwl, scores_bw, lengths_bw, _, _ = jax.lax.fori_loop(0, max_len, step, carry)
    best_b = jnp.argmax(scores_bw / length_penalty(lengths_bw, alpha), axis=1)
    return jnp.take_along_axis(tokens_bwl, best_b[:, None, None], axis=1)[:, 0]

  return beam_search
