"""Sequence-to-sequence training for training.loop.train: teacher forcing with label
smoothing, and held-out pairs decoded greedily (and with beam search) for eval.

  python main.py --model=transformer-tiny --data=synthetic:reverse   # or synthetic:sort
  python main.py --model=transformer-tiny --data=pairs.tsv           # source<TAB>target lines

Synthetic pairs are 8-16 random symbols (ids 3..3+SYMBOLS-1; 0, 1, 2 are padding, begin
and end); the training set holds TRAIN_PAIRS of them and the held-out set EVAL_PAIRS more
from another seed. Text pairs are encoded with the run's tokenizer, whose end-of-text (or
[SEP]) ends a target; padding and begin take the two ids after the tokenizer's. Eval lines
report eval_loss (label-smoothed), eval_nll, eval_token_accuracy (teacher forcing),
eval_exact_match (greedy decoding), eval_beam_exact_match (with --beam_size > 1) and, for
text, eval_bleu (corpus BLEU-4 of the greedy outputs, in percent).
"""
import dataclasses
import os

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from lmlab.data.errors import DataError
from lmlab.data import tokenizer as tokenizer_lib
from lmlab.data.corpus import Document
from lmlab.data.seq2seq import (Seq2SeqSpecials, read_pairs_tsv, sample_batch, seq2seq_batch,
                                synthetic_pairs)
from lmlab.models.config import ConfigError
from lmlab.models.seq2seq import make_beam_search, make_greedy
from lmlab.training.bleu import corpus_bleu
from lmlab.training.language_modeling import load_run_tokenizer
from lmlab.training.objective import Objective

SYNTHETIC_PREFIX = 'synthetic:'
SYMBOLS = 20
TRAIN_PAIRS = 100_000
EVAL_PAIRS = 512


def smoothed_cross_entropy(logits_btv, targets_bt, weights_bt, smoothing: float):
  """(label-smoothed loss, plain negative log-likelihood), weighted means over tokens.

  Smoothing gives the target 1 - smoothing and spreads `smoothing` evenly over the
  vocabulary (Szegedy et al. 2016), as Vaswani et al. 2017 with 0.1.
  """
  logp_btv = jax.nn.log_softmax(logits_btv.astype(jnp.float32))
  nll_bt = -jnp.take_along_axis(logp_btv, targets_bt[..., None], axis=-1)[..., 0]
  smoothed_bt = (1.0 - smoothing) * nll_bt - smoothing * jnp.mean(logp_btv, axis=-1)
  total = jnp.maximum(jnp.sum(weights_bt), 1.0)
  return jnp.sum(smoothed_bt * weights_bt) / total, jnp.sum(nll_bt * weights_bt) / total


class Seq2Seq(Objective):
  """The objective (training/objective.py) of an encoder_decoder model."""

  def __init__(self, train_config, model_config, *, log=print):
    del log
    if model_config.family != 'encoder_decoder':
      raise ConfigError(f'--objective=seq2seq trains an encoder_decoder (a transformer-* '
                        f'preset), not family={model_config.family}')
    self.config = train_config
    data = train_config.data or ''
    if data.startswith(SYNTHETIC_PREFIX):
      task = data[len(SYNTHETIC_PREFIX):]
      self.tokenizer, self.specials, self.n_valid = None, Seq2SeqSpecials(0, 1, 2), 3 + SYMBOLS
      self.train_pairs = synthetic_pairs(task, TRAIN_PAIRS, seed=train_config.seed,
                                         first_id=3, n_symbols=SYMBOLS)
      self.val_pairs = synthetic_pairs(task, EVAL_PAIRS, seed=train_config.seed + 1,
                                       first_id=3, n_symbols=SYMBOLS)
    elif os.path.isfile(data):
      self.tokenizer = load_run_tokenizer(
          train_config, {'train': [Document(data, os.path.basename(data))]})
      n = self.tokenizer.n_vocab
      self.specials = Seq2SeqSpecials(pad=n, bos=n + 1, eos=tokenizer_lib.separator_id(
          self.tokenizer))
      self.n_valid = n
      pairs = read_pairs_tsv(data, self.tokenizer.encode_ordinary)
      order = np.random.default_rng(0).permutation(len(pairs))
      n_val = max(1, round(train_config.val_fraction * len(pairs)))
      if len(pairs) <= n_val:
        raise DataError(f'{data} has too few pairs to hold {n_val} out; add lines')
      self.val_pairs = [pairs[i] for i in order[:n_val]]
      self.train_pairs = [pairs[i] for i in order[n_val:]]
    else:
      raise DataError(f'--data={data!r}: pass a source<TAB>target file or synthetic:<task> '
                      '(reverse, sort) for a sequence-to-sequence model')
    every = self.train_pairs + self.val_pairs
    self.source_len = max(len(s) for s, _ in every)
    self.target_len = max(len(t) for _, t in every) + 1
    if max(self.source_len, self.target_len) > train_config.seq_len:
      raise DataError(f'a pair has {self.source_len} source or {self.target_len - 1} target '
                      f'tokens, more than --seq_len={train_config.seq_len}; raise it')
    vocab = model_config.vocab_size or -(-(max(self.specials.pad, self.specials.bos) + 1)
                                         // 64) * 64
    if vocab <= max(self.specials.pad, self.specials.bos):
      raise ConfigError(f'vocab_size={vocab} leaves no room for the padding and begin ids '
                        f'{self.specials.pad} and {self.specials.bos}; raise it or set it to 0')
    self.model_config = dataclasses.replace(model_config, vocab_size=vocab).validate()
    self._eval_fns = {}

  def load_data(self):
    """Pairs are read in __init__: their lengths shape the batches."""

  def train_batch(self, step: int):
    return sample_batch(self.train_pairs, self.specials, seed=self.config.seed, step=step,
                        batch_size=self.config.batch_size, source_len=self.source_len,
                        target_len=self.target_len)

  def loss(self, model, batch, dropout_key, frozen=None):
    logits_btv = model(batch['source'], batch['source_mask'], batch['decoder_inputs'],
                       dropout_key=dropout_key)
    weights_bt = batch['target_mask'].astype(jnp.float32)
    loss, nll = smoothed_cross_entropy(logits_btv, batch['targets'], weights_bt,
                                       self.config.label_smoothing)
    correct_bt = jnp.argmax(logits_btv, axis=-1) == batch['targets']
    accuracy = jnp.sum(correct_bt * weights_bt) / jnp.maximum(jnp.sum(weights_bt), 1.0)
    return loss, {'loss': loss, 'nll': nll, 'token_accuracy': accuracy}

  def _decoders(self, graphdef):
    if graphdef not in self._eval_fns:
      common = dict(max_len=self.target_len, bos=self.specials.bos, eos=self.specials.eos,
                    n_valid=self.n_valid)
      decoders = {'exact_match': make_greedy(graphdef, **common)}
      if self.config.beam_size > 1:
        decoders['beam_exact_match'] = make_beam_search(
            graphdef, beam_size=self.config.beam_size, alpha=self.config.length_penalty,
            **common)
      metrics = jax.jit(lambda params, batch: self.loss(nnx.merge(graphdef, params), batch,
                                                        None)[1])
      self._eval_fns[graphdef] = metrics, decoders
    return self._eval_fns[graphdef]

  def _cut(self, tokens):
    """A decoded row up to its first eos."""
    tokens = list(tokens)
    return tokens[:tokens.index(self.specials.eos)] if self.specials.eos in tokens else tokens

  def evaluate(self, graphdef, params):
    metrics_fn, decoders = self._decoders(graphdef)
    size, pairs = self.config.micro_batch_size, self.val_pairs
    totals, outputs = {}, {name: [] for name in decoders}
    for start in range(0, len(pairs), size):
      chunk = pairs[start:start + size]
      # The last chunk is topped up with copies of its first pair; only len(chunk) count.
      batch = seq2seq_batch(chunk + chunk[:1] * (size - len(chunk)), self.specials,
                            source_len=self.source_len, target_len=self.target_len)
      for name, value in jax.device_get(metrics_fn(params, batch)).items():
        totals[name] = totals.get(name, 0.0) + float(value) * len(chunk)
      for name, decode in decoders.items():
        tokens = jax.device_get(decode(params, batch['source'], batch['source_mask']))
        outputs[name] += [self._cut(row) for row in tokens[:len(chunk)]]
    result = {f'eval_{name}': total / len(pairs) for name, total in totals.items()}
    result['eval_loss'] = result.pop('eval_loss')
    for name, decoded in outputs.items():
      result[f'eval_{name}'] = float(np.mean([d == list(t) for d, (_, t) in
                                              zip(decoded, pairs)]))
    if self.tokenizer is not None:
      result['eval_bleu'] = corpus_bleu(
          [self.tokenizer.decode(d, errors='replace').split() for d in outputs['exact_match']],
          [self.tokenizer.decode(list(t), errors='replace').split() for _, t in pairs])
    return result
