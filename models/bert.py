"""BERT (Devlin et al. 2019) and RoBERTa (Liu et al. 2019): the spine's blocks as a
bidirectional encoder, with token-type embeddings, a pooler and the pre-training heads.

  from lmlab.models.registry import build
  model = build(dataclasses.replace(preset('bert-tiny'), vocab_size=1000), rngs=nnx.Rngs(0))
  out = model(input_ids_bt, token_type_ids_bt, attention_mask_bt, output_hidden_states=True)
  out.last_hidden_state, out.pooler_output, out.mlm_logits, out.nsp_logits, out.hidden_states

A config of family=encoder says which heads exist (pooler, mlm_head, nsp_head, n_labels);
every axis of the spine still applies (Pre-LN, RMSNorm, RoPE or ALiBi BERT). The BERT
presets (models/config.py) are post-LN LayerNorm blocks with exact GELU, learned positions,
and a LayerNorm after the embeddings. Hugging Face checkpoints: models/hf/bert.py.
"""
import flax.struct
import jax
import jax.numpy as jnp
from flax import nnx

from lmlab.models.block import PLACEMENTS, Block, identity
from lmlab.models.config import ModelConfig
from lmlab.models.dense import Dense, matmul_last_axis
from lmlab.models.mlp import ACTIVATIONS
from lmlab.models.normalization import make_norm
from lmlab.models.positions import make_position_encoding
from lmlab.models.sharding import EMBED, VOCAB, initializer, param
from lmlab.models.stack import run_blocks, split_keys


@flax.struct.dataclass
class EncoderOutput:
  last_hidden_state: jax.Array                  # [B, T, D], after the final norm if any
  pooler_output: jax.Array | None = None        # [B, D]: tanh(dense(first token))
  mlm_logits: jax.Array | None = None           # [B, T, V]
  nsp_logits: jax.Array | None = None           # [B, 2]: 0 is "B follows A", 1 "random B"
  classifier_logits: jax.Array | None = None    # [B, n_labels]
  # With output_hidden_states: the embeddings' output, then each layer's, [B, T, D] each.
  hidden_states: tuple | None = None


class MaskedLMHead(nnx.Module):
  """dense -> activation -> norm -> the word embeddings (tied) or a matrix of its own, plus
  an output bias of its own."""

  def __init__(self, config: ModelConfig, *, dtype, param_dtype, rngs):
    d, vocab = config.d_model, config.vocab_size
    self.activation = config.mlp
    self.dense = Dense(d, d, axes=(EMBED, None), use_bias=True, init_std=config.init_std,
                       dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    self.norm = make_norm(config.norm, d, eps=config.norm_eps, dtype=dtype,
                          param_dtype=param_dtype)
    self.decoder = (None if config.tie_embeddings else
                    Dense(d, vocab, axes=(EMBED, VOCAB), use_bias=False,
                          init_std=config.init_std, dtype=dtype, param_dtype=param_dtype,
                          rngs=rngs))
    self.bias = param(jnp.zeros((vocab,), param_dtype), (VOCAB,))

  def __call__(self, x_btd, embedding_vd):
    h_btd = self.norm(ACTIVATIONS[self.activation](self.dense(x_btd)))
    w_dv = embedding_vd.T if self.decoder is None else self.decoder.kernel[...]
    return matmul_last_axis(h_btd, w_dv.astype(h_btd.dtype)) + self.bias[...].astype(h_btd.dtype)


class Bert(nnx.Module):

  def __init__(self, config: ModelConfig, *, rngs: nnx.Rngs):
    config.buildable('encoder')
    self.config = config
    dtype, param_dtype = jnp.dtype(config.dtype), jnp.dtype(config.param_dtype)
    d = config.d_model

    def embedding(rows, rows_axis):
      return nnx.Embed(rows, d, dtype=dtype, param_dtype=param_dtype, rngs=rngs,
                       embedding_init=initializer(nnx.initializers.normal(config.init_std),
                                                  (rows_axis, EMBED)))

    def dense(d_out):
      return Dense(d, d_out, axes=(EMBED, None), use_bias=True, init_std=config.init_std,
                   dtype=dtype, param_dtype=param_dtype, rngs=rngs)

    def norm_if(wanted):
      return (make_norm(config.norm, d, eps=config.norm_eps, dtype=dtype,
                        param_dtype=param_dtype) if wanted else identity)

    self.embed = embedding(config.vocab_size, VOCAB)
    self.token_types = (embedding(config.type_vocab_size, None) if config.type_vocab_size
                        else None)
    self.positions = make_position_encoding(config, dtype=dtype, param_dtype=param_dtype,
                                            rngs=rngs)
    self.embed_norm = norm_if(config.embed_norm)
    self.blocks = nnx.List([Block(config, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
                            for _ in range(config.n_layers)])
    self.final_norm = norm_if(PLACEMENTS[config.norm_placement].final_norm)
    self.pooler = dense(d) if config.pooler else None
    self.mlm = (MaskedLMHead(config, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
                if config.mlm_head else None)
    self.nsp = dense(2) if config.nsp_head else None
    self.classifier = dense(config.n_labels) if config.n_labels else None
    self.dropout = nnx.Dropout(config.dropout_rate)

  def positions_of(self, attention_mask_bt, shape):
    """0..T-1 (BERT); with a position_offset, offset + the index among the real tokens, and
    offset - 1 (the padding index) on padding (RoBERTa)."""
    offset = self.config.position_offset
    if not offset:
      return jnp.broadcast_to(jnp.arange(shape[1]), shape)
    real_bt = (jnp.ones(shape, jnp.int32) if attention_mask_bt is None
               else jnp.asarray(attention_mask_bt, jnp.int32))
    return jnp.cumsum(real_bt, axis=1) * real_bt + offset - 1

  def __call__(self, input_ids, token_type_ids=None, attention_mask=None,
               output_hidden_states=False, *, mlm_positions_bm=None, dropout_key=None):
    """The encoder's outputs (EncoderOutput) for input_ids [B, T].

    token_type_ids [B, T] default to 0; attention_mask [B, T] is 1 on tokens and 0 on
    padding, which no token attends to. mlm_positions_bm [B, M], when given, limits the
    masked-LM logits to those positions ([B, M, V]; pre-training predicts only the masked
    tokens, as BERT's masked_lm_positions). Dropout is applied only with a dropout_key.
    """
    config = self.config
    t = input_ids.shape[1]
    config.check_positions(t, 'sequence length')
    keys = split_keys(dropout_key, config.n_layers + 2)
    positions_bt = self.positions_of(attention_mask, input_ids.shape)
    x_btd = self.embed(input_ids)
    if self.token_types is not None:
      if token_type_ids is None:
        token_type_ids = jnp.zeros(input_ids.shape, jnp.int32)
      x_btd = x_btd + self.token_types(token_type_ids)
    x_btd = self.embed_norm(self.positions.embed(x_btd, positions_bt))
    x_btd = self.dropout(x_btd, deterministic=dropout_key is None, rngs=keys[-2])
    mask = dict(alibi_slopes=self.positions.alibi_slopes(),
                segment_ids_bt=(None if attention_mask is None
                                else jnp.asarray(attention_mask, jnp.int32)))
    x_btd, _, hidden_states = run_blocks(
        self.blocks, x_btd, self.positions.rotation(positions_bt), mask,
        dropout_keys=keys[:config.n_layers], remat=config.remat)
    x_btd = self.final_norm(x_btd)

    out = {'last_hidden_state': x_btd}
    if output_hidden_states:
      out['hidden_states'] = tuple(hidden_states)
    if self.pooler is not None:
      out['pooler_output'] = jnp.tanh(self.pooler(x_btd[:, 0]))
    if self.mlm is not None:
      x_bmd = (x_btd if mlm_positions_bm is None else
               jnp.take_along_axis(x_btd, mlm_positions_bm[..., None], axis=1))
      out['mlm_logits'] = self.mlm(x_bmd, self.embed.embedding[...])
    if self.nsp is not None:
      out['nsp_logits'] = self.nsp(out['pooler_output'])
    if self.classifier is not None:
      pooled_bd = self.dropout(out['pooler_output'], deterministic=dropout_key is None,
                               rngs=keys[-1])
      out['classifier_logits'] = self.classifier(pooled_bd)
    return EncoderOutput(**out)
