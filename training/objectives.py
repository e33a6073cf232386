"""The objectives --objective names (OBJECTIVES), and those beside next-token prediction
(the interface is training/objective.py's docstring):

  BertPretraining         `--model=bert-tiny`: masked LM (80/10/10) + next sentence, or with
                          `--model=roberta-tiny` (--objective=roberta) RoBERTa's masked LM
                          of full-length spans with dynamic masking and no next sentence
  SupervisedFineTuning    `--objective=sft --data=chats.jsonl --init_from=runs/tiny`: the
                          next-token loss on the assistant turns of chat data
                          (training/sft.py)
  RewardModelling         `--objective=reward --data=pairs.jsonl --init_from=runs/tiny-sft`:
                          a reward model on preference pairs (training/preference.py)
  DirectPreference        `--objective=dpo --data=pairs.jsonl --init_from=runs/tiny-sft`:
                          DPO and its variants (training/preference.py)
  GroupRelative           `--objective=grpo --data=prompts.jsonl --reward=module:function
                          --init_from=runs/tiny-sft`: GRPO on the policy's samples
                          (training/online.py)
  RejectionSampling       `--objective=rsft ...`: SFT on the best of several samples
                          (training/online.py)
  ProximalPolicy          `--objective=ppo ...`: PPO with a KL penalty and a value head
                          (training/online.py)
  SequenceClassification  `--objective=classify --data=labels.tsv`: one label<TAB>text per
                          line, a classifier on BERT's pooled output; `--init_from` a
                          pre-trained run fine-tunes it
  Seq2Seq                 `--model=transformer-tiny --data=synthetic:reverse` (or a
                          source<TAB>target file): training/seq2seq.py
  Distillation            `--objective=distill --teacher=runs/tiny --set d_model=64`: a
                          student learns a frozen teacher's softened distribution
                          (training/distillation.py)

Each objective prepares its data, draws batches as pure functions of (seed, step), and
reports eval metrics under eval_* names beside eval_loss.
"""
import dataclasses
import math
import os

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from lmlab.data.errors import DataError
from lmlab.data.corpus import Document
from lmlab.data.files import read_lines
from lmlab.data.mlm import NOT_SELECTED, BertBatches, BertSpecials
from lmlab.models.config import ConfigError
from lmlab.training.distillation import Distillation
from lmlab.training.language_modeling import (LanguageModeling, check_fits, load_run_tokenizer,
                                              resolve_vocab)
from lmlab.training.objective import Objective
from lmlab.training.online import GroupRelative, ProximalPolicy, RejectionSampling
from lmlab.training.preference import DirectPreference, RewardModelling
from lmlab.training.seq2seq import Seq2Seq
from lmlab.training.sft import SupervisedFineTuning

BERT_SPECIALS = ('[PAD]', '[CLS]', '[SEP]', '[MASK]')


def bert_specials(tokenizer) -> BertSpecials:
  ids = getattr(tokenizer, 'special_ids', {})
  missing = [name for name in BERT_SPECIALS if name not in ids]
  if missing:
    raise DataError(f'tokenizer {tokenizer.name!r} has no {", ".join(missing)}; BERT needs a '
                    'WordPiece vocabulary: --tokenizer=wordpiece:<size> or a vocab.txt')
  return BertSpecials(pad=ids['[PAD]'], cls=ids['[CLS]'], sep=ids['[SEP]'], mask=ids['[MASK]'])


def require_encoder(model_config, objective: str):
  if model_config.family != 'encoder':
    raise ConfigError(f'--objective={objective} trains an encoder (a bert-* or roberta-* '
                      f'preset), not family={model_config.family}')


def mlm_capacity(seq_len: int) -> int:
  """Masked positions predicted per row: 15% of seq_len plus three standard deviations, so
  that a row rarely selects more (the excess is not predicted, as BERT's
  max_predictions_per_seq)."""
  return min(seq_len, math.ceil(0.15 * seq_len + 3 * math.sqrt(0.1275 * seq_len)) + 1)


def cross_entropy_and_accuracy(logits, labels, weights):
  """Weighted mean cross-entropy and accuracy, in float32."""
  logits = logits.astype(jnp.float32)
  safe_labels = jnp.maximum(labels, 0)
  losses = optax.softmax_cross_entropy_with_integer_labels(logits, safe_labels)
  correct = jnp.argmax(logits, axis=-1) == safe_labels
  total = jnp.maximum(jnp.sum(weights), 1.0)
  return jnp.sum(losses * weights) / total, jnp.sum(correct * weights) / total


def mean_eval_metrics(eval_fn, params, batches) -> dict:
  """Mean of eval_fn's metrics over batches, named eval_<metric>."""
  sums = {}
  for n, batch in enumerate(batches, 1):
    for name, value in jax.device_get(eval_fn(params, jax.tree.map(jnp.asarray, batch))).items():
      sums[name] = sums.get(name, 0.0) + float(value)
  return {f'eval_{name}': total / n for name, total in sums.items()}


class BertPretraining(LanguageModeling):
  """Masked LM + next-sentence prediction (objective 'bert'), or RoBERTa's masked LM
  ('roberta'), on the documents of the tokenised corpus."""

  def __init__(self, train_config, model_config, *, log=print):
    require_encoder(model_config, train_config.objective)
    self.next_sentence = train_config.objective == 'bert'
    if not model_config.mlm_head:
      raise ConfigError(f'--objective={train_config.objective} trains the masked-LM head; '
                        '--set mlm_head=true')
    if model_config.nsp_head != self.next_sentence:
      raise ConfigError(f'--objective={train_config.objective} needs nsp_head='
                        f'{str(self.next_sentence).lower()}; use a bert-* preset for BERT\'s '
                        'objective, roberta-* for RoBERTa\'s')
    super().__init__(train_config, model_config, log=log)
    self.specials = bert_specials(self.tokenizer)
    self.capacity = mlm_capacity(train_config.seq_len)

  def _batches(self, tokens, *, seed: int, batch_size: int) -> BertBatches:
    """Documents end at [SEP]; a split of a single document is cut into seq_len pieces so
    that next-sentence pairs can still draw a random B."""
    s = self.specials
    ends = np.flatnonzero(np.asarray(tokens) == s.sep) + 1
    documents = [d[:-1] if len(d) and d[-1] == s.sep else d for d in np.split(tokens, ends)]
    documents = [d for d in documents if len(d)]
    if self.next_sentence and len(documents) < 2:
      stream = np.concatenate(documents)
      documents = np.split(stream, range(self.config.seq_len, len(stream), self.config.seq_len))
    ordinary = np.setdiff1d(np.arange(self.tokenizer.n_vocab),
                            list(self.tokenizer.special_ids.values()))
    return BertBatches(documents, s, seq_len=self.config.seq_len, batch_size=batch_size,
                       seed=seed, replacement_ids=ordinary, next_sentence=self.next_sentence,
                       dynamic_masking=not self.next_sentence)

  def load_data(self):
    super().load_data()
    self.train_batches = self._batches(self.data['train'], seed=self.config.seed,
                                       batch_size=self.config.batch_size)
    self.val_batches = self._batches(self.data['val'], seed=self.config.seed + 1,
                                     batch_size=self.config.micro_batch_size)

  def train_batch(self, step: int):
    return self.train_batches.batch(step)

  def loss(self, model, batch, dropout_key, frozen=None):
    selected_bt = batch['labels'] != NOT_SELECTED
    # The first `capacity` selected positions of each row (a stable sort puts them first).
    positions_bm = jnp.argsort(~selected_bt, axis=1, stable=True)[:, :self.capacity]
    out = model(batch['inputs'], batch['token_type_ids'], batch['attention_mask'],
                mlm_positions_bm=positions_bm, dropout_key=dropout_key)
    labels_bm = jnp.take_along_axis(batch['labels'], positions_bm, axis=1)
    weights_bm = jnp.take_along_axis(selected_bt, positions_bm, axis=1).astype(jnp.float32)
    mlm_loss, mlm_accuracy = cross_entropy_and_accuracy(out.mlm_logits, labels_bm, weights_bm)
    metrics = {'mlm_loss': mlm_loss, 'mlm_accuracy': mlm_accuracy}
    loss = mlm_loss
    if self.next_sentence:
      nsp_loss, nsp_accuracy = cross_entropy_and_accuracy(
          out.nsp_logits, batch['is_random_next'], jnp.ones(batch['is_random_next'].shape))
      metrics.update(nsp_loss=nsp_loss, nsp_accuracy=nsp_accuracy)
      loss = loss + nsp_loss
    return loss, {'loss': loss, **metrics}

  def evaluate(self, graphdef, params):
    if graphdef not in self._eval_steps:
      self._eval_steps[graphdef] = jax.jit(
          lambda params, batch: self.loss(nnx.merge(graphdef, params), batch, None)[1])
    batches = (self.val_batches.batch(i) for i in range(self.config.eval_batches))
    return mean_eval_metrics(self._eval_steps[graphdef], params, batches)


def read_labelled(path: str):
  """[(label, text)] of a file of label<TAB>text lines (blank lines skipped)."""
  rows = []
  for number, line in enumerate(read_lines(path), 1):
    if not line.strip():
      continue
    label, tab, text = line.partition('\t')
    if not tab or not label:
      raise DataError(f'{path}:{number}: expected label<TAB>text')
    rows.append((label, text))
  if not rows:
    raise DataError(f'{path} holds no label<TAB>text lines')
  return rows


class SequenceClassification(Objective):
  """A classifier on the pooled output of an encoder; reports loss and accuracy.

  Lines of --data are held out at random (fixed, val_fraction of them); labels are the
  sorted distinct label strings. Each text becomes [CLS] text [SEP], cut to seq_len.
  """

  def __init__(self, train_config, model_config, *, log=print):
    del log
    require_encoder(model_config, 'classify')
    self.config = train_config
    if not train_config.data or not os.path.isfile(train_config.data):
      raise DataError('--objective=classify needs --data=<file> of label<TAB>text lines')
    rows = read_labelled(train_config.data)
    self.label_names = sorted({label for label, _ in rows})
    if len(self.label_names) < 2:
      raise DataError(f'{train_config.data} has one label ({self.label_names[0]!r}); a '
                      'classifier needs two or more')
    self.tokenizer = load_run_tokenizer(
        train_config, {'train': [Document(train_config.data, os.path.basename(train_config.data))]})
    self.specials = bert_specials(self.tokenizer)
    self.model_config = dataclasses.replace(
        resolve_vocab(model_config, self.tokenizer), pooler=True, mlm_head=False,
        nsp_head=False, n_labels=len(self.label_names)).validate()
    check_fits(self.model_config, self.tokenizer, train_config.seq_len)
    label_ids = {name: i for i, name in enumerate(self.label_names)}
    self.labels = np.asarray([label_ids[label] for label, _ in rows], np.int32)
    self.texts = [self.tokenizer.encode_ordinary(text)[:train_config.seq_len - 2]
                  for _, text in rows]
    order = np.random.default_rng(0).permutation(len(rows))
    n_val = max(1, round(train_config.val_fraction * len(rows)))
    self.val, self.train = order[:n_val], order[n_val:]
    if not len(self.train):
      raise DataError(f'{train_config.data} has too few lines to hold {n_val} out; add lines')
    self._eval_steps = {}

  def load_data(self):
    """Everything is read in __init__: the labels decide the model's head."""

  def _batch(self, indices, size: int):
    """Rows of `indices`, padded with weight-0 rows to `size`."""
    s = self.specials
    out = {'inputs': np.full((size, self.config.seq_len), s.pad, np.int32),
           'attention_mask': np.zeros((size, self.config.seq_len), np.int32),
           'labels': np.zeros(size, np.int32), 'weights': np.zeros(size, np.float32)}
    for row, index in enumerate(indices):
      tokens = [s.cls, *self.texts[index], s.sep]
      out['inputs'][row, :len(tokens)] = tokens
      out['attention_mask'][row, :len(tokens)] = 1
      out['labels'][row], out['weights'][row] = self.labels[index], 1.0
    out['token_type_ids'] = np.zeros_like(out['inputs'])
    return out

  def train_batch(self, step: int):
    rng = np.random.default_rng([self.config.seed, step])
    return self._batch(self.train[rng.integers(0, len(self.train), self.config.batch_size)],
                       self.config.batch_size)

  def loss(self, model, batch, dropout_key, frozen=None):
    out = model(batch['inputs'], batch['token_type_ids'], batch['attention_mask'],
                dropout_key=dropout_key)
    loss, accuracy = cross_entropy_and_accuracy(out.classifier_logits, batch['labels'],
                                                batch['weights'])
    return loss, {'loss': loss, 'accuracy': accuracy}

  def evaluate(self, graphdef, params):
    """Loss and accuracy over every held-out line."""
    if graphdef not in self._eval_steps:
      self._eval_steps[graphdef] = jax.jit(
          lambda params, batch: self.loss(nnx.merge(graphdef, params), batch, None)[1])
    size = self.config.micro_batch_size
    totals = {}
    for start in range(0, len(self.val), size):
      chunk = self.val[start:start + size]
      metrics = self._eval_steps[graphdef](params, self._batch(chunk, size))
      for name, value in jax.device_get(metrics).items():
        totals[name] = totals.get(name, 0.0) + float(value) * len(chunk)
    return {f'eval_{name}': total / len(self.val) for name, total in totals.items()}


# --objective names and their classes; 'bert' and 'roberta' differ in the run's TrainConfig.
OBJECTIVES = {'lm': LanguageModeling, 'sft': SupervisedFineTuning, 'reward': RewardModelling,
              'dpo': DirectPreference, 'grpo': GroupRelative, 'rsft': RejectionSampling,
              'ppo': ProximalPolicy,
              'bert': BertPretraining, 'roberta': BertPretraining,
              'classify': SequenceClassification, 'seq2seq': Seq2Seq, 'distill': Distillation}


def by_name(name: str):
  """The objective class --objective=name trains."""
  if name not in OBJECTIVES:
    raise ConfigError(f'--objective={name!r} is not one of {", ".join(OBJECTIVES)}')
  return OBJECTIVES[name]
