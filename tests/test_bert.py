"""The BERT encoder: parameter counts from the config arithmetic, bidirectional attention
that never sees padding (by gradients) on every axis of the spine, heads, and errors.

Parity of every output with Hugging Face's BERT and RoBERTa is in tests/test_hf_bert.py.
"""
import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from conftest import jit_call
from lmlab.models.config import ConfigError, preset
from lmlab.models.registry import build, param_count


def bert_config(**fields):
  base = dataclasses.replace(preset('bert-tiny'), vocab_size=61, d_model=32, n_heads=4,
                             n_kv_heads=4, ffn_dim=48, max_seq_len=64)
  return dataclasses.replace(base, **fields).validate()


def build_bert(config, rng):
  return build(config, rngs=nnx.Rngs(int(rng.integers(1 << 30))))


@pytest.mark.parametrize('name,encoder_only', [('bert-base', 109_482_240),
                                               ('bert-large', 335_141_888)])
def test_parameter_counts_follow_the_config_arithmetic(name, encoder_only):
  """Embeddings (V + 512 + 2 + 2) d; each layer 12 d^2 + 13 d; then pooler, MLM and NSP heads.
  BertModel (encoder and pooler) has the totals transformers reports for these configs."""
  config = preset(name)
  d, v, n = config.d_model, config.vocab_size, config.n_layers
  pooler = d * d + d
  assert (v + 516) * d + n * (12 * d * d + 13 * d) + pooler == encoder_only
  mlm = d * d + d + 2 * d + v  # transform dense, its LayerNorm, output bias (decoder tied)
  nsp = 2 * d + 2
  assert param_count(config) == encoder_only + mlm + nsp


class ShiftedEmbedding(nnx.Module):
  """The word embedding plus a differentiable offset per (batch, position)."""

  def __init__(self, embed, offset_btd):
    self.embedding = embed.embedding  # The table, as the tied MLM decoder reads it.
    self.offset = nnx.Variable(offset_btd)

  def __call__(self, tokens_bt):
    return self.embedding[...][tokens_bt] + self.offset[...]


@pytest.mark.parametrize('fields', [
    dict(), dict(norm_placement='pre', norm='rmsnorm', position='rope'),
    dict(position='alibi', mlp='swiglu'), dict(position='sinusoidal', n_kv_heads=2),
    dict(position_offset=2, type_vocab_size=1)])
def test_every_token_sees_every_real_token_and_no_padding(fields, rng):
  config = bert_config(**fields)
  graphdef, params = nnx.split(build_bert(config, rng))
  t, n_real = 9, int(rng.integers(3, 9))
  tokens = jnp.asarray(rng.integers(0, config.vocab_size, (1, t)), jnp.int32)
  mask = jnp.asarray(np.arange(t) < n_real, jnp.int32)[None]
  query = int(rng.integers(0, n_real))

  def output_at_query(offset_btd):
    model = nnx.merge(graphdef, params)
    model.embed = ShiftedEmbedding(model.embed, offset_btd)
    out = model(tokens, attention_mask=mask)
    return out.last_hidden_state[0, query].sum() + out.mlm_logits[0, query].sum()

  grad_td = np.asarray(jax.jit(jax.grad(output_at_query))(jnp.zeros((1, t, config.d_model)))[0])
  assert np.all(np.any(grad_td[:n_real] != 0.0, axis=-1))  # before and after the query
  assert np.all(grad_td[n_real:] == 0.0)


def test_heads_follow_the_config(rng):
  tokens = jnp.asarray(rng.integers(0, 61, (2, 7)), jnp.int32)
  out = jit_call(build_bert(bert_config(), rng), output_hidden_states=True)(tokens)
  assert out.last_hidden_state.shape == (2, 7, 32)
  assert out.pooler_output.shape == (2, 32) and out.nsp_logits.shape == (2, 2)
  assert out.mlm_logits.shape == (2, 7, 61) and out.classifier_logits is None
  assert len(out.hidden_states) == 3
  np.testing.assert_array_equal(np.asarray(out.hidden_states[-1]),
                                np.asarray(out.last_hidden_state))  # post-LN: no final norm
  classifier = bert_config(mlm_head=False, nsp_head=False, n_labels=5)
  out = jit_call(build_bert(classifier, rng))(tokens)
  assert out.mlm_logits is None and out.nsp_logits is None and out.hidden_states is None
  assert out.classifier_logits.shape == (2, 5)


def test_dropout_only_with_a_key(rng):
  model = jit_call(build_bert(bert_config(dropout_rate=0.5, n_labels=3), rng))
  tokens = jnp.asarray(rng.integers(0, 61, (2, 7)), jnp.int32)
  plain, again = model(tokens), model(tokens)
  key = jax.random.key(int(rng.integers(1 << 30)))
  dropped, same_key = model(tokens, dropout_key=key), model(tokens, dropout_key=key)
  np.testing.assert_array_equal(np.asarray(plain.mlm_logits), np.asarray(again.mlm_logits))
  np.testing.assert_array_equal(np.asarray(dropped.classifier_logits),
                                np.asarray(same_key.classifier_logits))
  assert not np.allclose(np.asarray(plain.mlm_logits), np.asarray(dropped.mlm_logits))


@pytest.mark.parametrize('fields,match', [
    (dict(nsp_head=True, pooler=False), 'pooler=true'),
    (dict(position_offset=2, position='rope'), 'position=learned'),
    (dict(sliding_window=4), 'causal'),
    (dict(position='rope', dca_chunk_size=32, dca_local_size=4), 'family=decoder'),
])
def test_bad_encoder_configs_are_config_errors(fields, match):
  with pytest.raises(ConfigError, match=match):
    bert_config(**fields)
  with pytest.raises(ConfigError, match='family=encoder only'):
    dataclasses.replace(preset('tiny'), pooler=True).validate()


def test_longer_than_the_position_table_is_a_config_error(rng):
  model = jit_call(build_bert(bert_config(max_seq_len=8, position_offset=2), rng))
  model(jnp.zeros((1, 6), jnp.int32))
  with pytest.raises(ConfigError, match='position table'):
    model(jnp.zeros((1, 7), jnp.int32))
