"""The encoder-decoder Transformer: parameter counts from the paper's arithmetic, encoder
bidirectionality and decoder causality by gradients, cross-attention that sees every real
source token, cached decoding against the full forward pass, beam search against greedy
decoding and against the model's own scores, label smoothing and the schedule by formula,
BLEU by hand, and a short reversal run that learns."""
import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from lmlab.models.config import ConfigError, preset
from lmlab.models.registry import build, param_count
from lmlab.models.seq2seq import length_penalty, make_beam_search, make_greedy
from lmlab.training.bleu import corpus_bleu
from lmlab.training.optimizer import OptimizerConfig, schedule
from lmlab.training.seq2seq import smoothed_cross_entropy

BOS, EOS = 1, 2


def tiny_config(**fields):
  base = dataclasses.replace(preset('transformer-tiny'), vocab_size=37, d_model=32, n_heads=4,
                             n_kv_heads=4, ffn_dim=48, max_seq_len=64, attention_impl='xla')
  return dataclasses.replace(base, **fields).validate()


def build_model(config, rng):
  return build(config, rngs=nnx.Rngs(int(rng.integers(1 << 30))))


def random_source(rng, b=3, s=7):
  source = rng.integers(3, 37, (b, s))
  mask = np.ones_like(source)
  for row in range(1, b):
    mask[row, int(rng.integers(1, s)):] = 0
  return jnp.asarray(source * mask, jnp.int32), jnp.asarray(mask, jnp.int32)


@pytest.mark.parametrize('name,vocab', [('transformer-base', 37000), ('transformer-big', 37000)])
def test_parameter_counts_follow_the_papers_arithmetic(name, vocab):
  """One shared embedding V d; encoder layers: attention 4 (d^2 + d), FFN 2 d f + f + d and two
  LayerNorms; decoder layers add cross-attention and a third LayerNorm."""
  config = preset(name)
  d, f = config.d_model, config.ffn_dim
  attention, ffn, norm = 4 * (d * d + d), 2 * d * f + f + d, 2 * d
  expected = (vocab * d + config.n_layers * (attention + ffn + 2 * norm)
              + config.decoder_layers * (2 * attention + ffn + 3 * norm))
  assert param_count(config) == expected
  if name == 'transformer-base':  # "65M" in the paper's Table 3
    assert abs(expected - 65e6) / 65e6 < 0.05


class ShiftedEmbedding(nnx.Module):
  """An embedding plus a differentiable offset per (batch, position)."""

  def __init__(self, embed, offset_btd):
    self.embedding = embed.embedding
    self.offset = nnx.Variable(offset_btd)

  def __call__(self, tokens_bt):
    return self.embedding[...][tokens_bt] + self.offset[...]


@pytest.mark.parametrize('fields', [dict(tie_embeddings=False, norm_placement='pre',
                                         position='learned', mlp='gelu')])
def test_encoder_sees_every_real_token_and_decoder_only_the_past(fields, rng):
  config = tiny_config(**fields)
  graphdef, params = nnx.split(build_model(config, rng))
  source, source_mask = random_source(rng, b=1, s=8)
  source_mask = source_mask.at[0, 6:].set(0)
  target = jnp.asarray(rng.integers(3, 37, (1, 9)), jnp.int32)
  t = int(rng.integers(0, 9))

  def output_at_t(source_offset, target_offset):
    model = nnx.merge(graphdef, params)
    model.source_embed = ShiftedEmbedding(model.source_embed, source_offset)
    model.embed = ShiftedEmbedding(model.embed, target_offset)
    return model(source, source_mask, target)[0, t].sum()

  source_grad, target_grad = jax.jit(jax.grad(output_at_t, argnums=(0, 1)))(
      jnp.zeros((1, 8, config.d_model)), jnp.zeros((1, 9, config.d_model)))
  source_grad, target_grad = np.asarray(source_grad[0]), np.asarray(target_grad[0])
  assert np.all(np.any(source_grad[:6] != 0.0, axis=-1))  # every real source token
  assert np.all(source_grad[6:] == 0.0)                    # no source padding
  assert np.all(np.any(target_grad[:t + 1] != 0.0, axis=-1))
  assert np.all(target_grad[t + 1:] == 0.0)                # no target future


@pytest.mark.parametrize('fields', [dict(),
                                    dict(n_kv_heads=2, position='rope', tie_embeddings=False)])
def test_cached_decoding_equals_the_full_forward_pass(fields, rng):
  graphdef, params = nnx.split(build_model(tiny_config(**fields), rng))
  source, source_mask = random_source(rng)
  target = jnp.asarray(rng.integers(3, 37, (3, 6)), jnp.int32)

  @jax.jit
  def full_and_stepwise(params):
    model = nnx.merge(graphdef, params)
    memories = model.memories(model.encode(source, source_mask), source_mask)
    caches, steps = model.init_cache(3, 8), []
    for i in range(6):
      logits, caches = model.decode(target[:, i:i + 1], memories, caches=caches, cache_index=i)
      steps.append(logits)
    return model(source, source_mask, target), jnp.concatenate(steps, axis=1)

  full, stepwise = full_and_stepwise(params)
  np.testing.assert_allclose(np.asarray(stepwise), np.asarray(full), rtol=1e-5, atol=1e-5)


def sequence_score(model, source, source_mask, tokens, alpha):
  """log P(tokens up to and including the first eos) / length_penalty, per row, by teacher
  forcing: the oracle a beam search should maximise."""
  b, n = tokens.shape
  decoder_inputs = jnp.concatenate([jnp.full((b, 1), BOS), tokens[:, :-1]], axis=1)
  logp = jax.nn.log_softmax(nnx.jit(lambda m: m(source, source_mask, decoder_inputs))(model))
  token_logp = np.asarray(jnp.take_along_axis(logp, tokens[..., None], axis=-1)[..., 0])
  scores = []
  for row in range(b):
    ids = list(np.asarray(tokens[row]))
    length = ids.index(EOS) + 1 if EOS in ids else n
    scores.append(token_logp[row, :length].sum() / length_penalty(length, alpha))
  return np.asarray(scores)


def test_beam_search_of_one_is_greedy_and_wider_beams_score_at_least_as_well(rng):
  config = tiny_config()
  model = build_model(config, rng)
  graphdef, params = nnx.split(model)
  source, source_mask = random_source(rng, b=4)
  common = dict(max_len=10, bos=BOS, eos=EOS, n_valid=37)
  greedy = make_greedy(graphdef, **common)(params, source, source_mask)
  beam_one = make_beam_search(graphdef, beam_size=1, **common)(params, source, source_mask)
  np.testing.assert_array_equal(np.asarray(beam_one), np.asarray(greedy))
  beam = make_beam_search(graphdef, beam_size=5, alpha=0.6, **common)(params, source,
                                                                       source_mask)
  assert beam.shape == greedy.shape
  greedy_scores = sequence_score(model, source, source_mask, greedy, 0.6)
  beam_scores = sequence_score(model, source, source_mask, beam, 0.6)
  assert np.all(beam_scores >= greedy_scores - 1e-4)


def test_label_smoothing_and_inverse_sqrt_schedule_formulas(rng):
  logits = jnp.asarray(rng.normal(size=(2, 3, 7)), jnp.float32)
  targets = jnp.asarray(rng.integers(0, 7, (2, 3)))
  weights = jnp.asarray([[1, 1, 0], [1, 0, 0]], jnp.float32)
  logp = np.asarray(jax.nn.log_softmax(logits))
  q = np.full((2, 3, 7), 0.1 / 7) + 0.9 * np.eye(7)[np.asarray(targets)]
  expected = (-(q * logp).sum(-1) * np.asarray(weights)).sum() / 3
  loss, nll = smoothed_cross_entropy(logits, targets, weights, 0.1)
  np.testing.assert_allclose(float(loss), expected, rtol=1e-5)
  plain = -np.take_along_axis(logp, np.asarray(targets)[..., None], -1)[..., 0]
  np.testing.assert_allclose(float(nll), (plain * np.asarray(weights)).sum() / 3, rtol=1e-5)

  lr = schedule(OptimizerConfig(learning_rate=1e-3, warmup_steps=400, schedule='inverse_sqrt'))
  d = 512  # The paper: d^-0.5 min(step^-0.5, step warmup^-1.5), scaled to peak at 1e-3.
  paper = lambda s: d ** -0.5 * min(s ** -0.5, s * 400 ** -1.5)
  for step in (1, 100, 400, 1600, 10000):
    np.testing.assert_allclose(float(lr(step)), 1e-3 * paper(step) / paper(400), rtol=1e-5)


def test_bleu_by_hand():
  # Precisions 5/6, 3/5, 2/4, 1/3; no brevity penalty.
  hypothesis, reference = 'the cat sat on the mat'.split(), 'the cat sat on a mat'.split()
  expected = 100 * (5 / 6 * 3 / 5 * 2 / 4 * 1 / 3) ** 0.25
  assert math.isclose(corpus_bleu([hypothesis], [reference]), expected)
  # Brevity: a 4-word hypothesis of an 8-word reference is penalised by exp(1 - 8/4).
  assert math.isclose(corpus_bleu([['a', 'b', 'c', 'd']], [['a', 'b', 'c', 'd', 'e', 'f', 'g',
                                                             'h']]), 100 * math.exp(1 - 2))
  assert corpus_bleu([['x']], [['y']]) == 0.0


def test_bad_encoder_decoder_configs_are_config_errors():
  with pytest.raises(ConfigError, match='cross-attention'):
    tiny_config(parallel_block=True)
  with pytest.raises(ConfigError, match='causal'):
    tiny_config(causal=False)
