"""Supervised fine-tuning on chat data (objective 'sft').

  python main.py --objective=sft --data=chats.jsonl --init_from=runs/tiny \
      --workdir=runs/tiny-sft --chat_template=chatml [--set peft=lora]

--data is a JSONL file of conversations ({"messages": [...]} or {"prompt", "completion"}
per line; data/chat.py). Each is rendered with --chat_template, whose special tokens join the
tokenizer (and the vocabulary grows when they do not fit), and conversations are packed into
sequences as segments of their own (data/sft_batches.py; one per row for prompt tuning). The
loss is the next-token cross-entropy of the assistant's tokens only: the mean over the
micro-batch's trained tokens, whose number the metric trained_tokens reports. The last
val_fraction of the conversations are held out.
"""
import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from lmlab.data import chat
from lmlab.data import sft_batches
from lmlab.data.chat_template import chat_template
from lmlab.data.errors import DataError
from lmlab.models.config import UNPACKED_PEFTS, ModelConfig
from lmlab.models.errors import ConfigError
from lmlab.training.config import TrainConfig
from lmlab.training.language_modeling import check_fits, load_run_tokenizer, resolve_vocab
from lmlab.training.objective import Objective


def masked_cross_entropy(logits_btv, targets_bt, mask_bt):
  """(mean cross-entropy over the tokens where mask_bt is 1, how many there are)."""
  logits_btv = logits_btv.astype(jnp.float32)
  log_z_bt = jax.nn.logsumexp(logits_btv, axis=-1)
  target_logit_bt = jnp.take_along_axis(logits_btv, targets_bt[..., None], axis=-1)[..., 0]
  mask_bt = mask_bt.astype(jnp.float32)
  count = jnp.sum(mask_bt)
  return jnp.sum((log_z_bt - target_logit_bt) * mask_bt) / jnp.maximum(count, 1.0), count


def fitting_vocab(model_config: ModelConfig, tokenizer) -> ModelConfig:
  """The config with vocab_size grown (to a multiple of 64) when the tokenizer's added tokens
  do not fit; models/registry and init_from keep the rows the old vocabulary had."""
  if model_config.vocab_size >= tokenizer.n_vocab:
    return model_config
  return dataclasses.replace(model_config, vocab_size=-(-tokenizer.n_vocab // 64) * 64)


def chat_model_config(model_config: ModelConfig, tokenizer, seq_len: int,
                      adjust=lambda config: config) -> ModelConfig:
  """The model config of a run on chat data: its vocabulary the tokenizer's (grown to hold the
  chat template's tokens), then adjust(config), validated and checked against seq_len."""
  config = adjust(fitting_vocab(resolve_vocab(model_config, tokenizer), tokenizer)).validate()
  check_fits(config, tokenizer, seq_len)
  return config


def held_out_count(total: int, what: str, train_config: TrainConfig) -> int:
  """How many of the `total` examples of --data (`what`: conversations, pairs, ...) are held
  out: --val_fraction of them, at least one, leaving some to train on."""
  n_val = max(1, round(train_config.val_fraction * total))
  if total <= n_val:
    raise DataError(f'{train_config.data} has {total} {what}, too few to hold {n_val} out; add '
                    'some or lower --val_fraction')
  return n_val


class SupervisedFineTuning(Objective):

  def __init__(self, train_config: TrainConfig, model_config: ModelConfig, *, log=print):
    if model_config.family != 'decoder':
      raise ConfigError(f'--objective=sft fine-tunes a decoder, not family={model_config.family}')
    if not train_config.data:
      raise DataError('--objective=sft needs --data=<file.jsonl> of conversations')
    self.config, self.log = train_config, log
    self.template = chat_template(train_config.chat_template)
    self.tokenizer = load_run_tokenizer(train_config)
    self.model_config = chat_model_config(model_config, self.tokenizer, train_config.seq_len,
                                          self._with_new_tokens_trained)
    self._eval_steps = {}
    self._read_conversations()

  def _with_new_tokens_trained(self, model_config: ModelConfig) -> ModelConfig:
    """Under a PEFT method, unless trainable_tokens says otherwise, the config with the rows of
    the template's tokens that the tokenizer lacked (fresh rows, never trained) training."""
    if not model_config.peft or model_config.trainable_tokens:
      return model_config
    _, added = chat.with_special_tokens(
        load_run_tokenizer(dataclasses.replace(self.config, chat_template=None)),
        self.template.special_tokens)
    if not added:
      return model_config
    ids = [self.tokenizer.encode_single_token(token) for token in added]
    self.log(f'the rows of {", ".join(added)}, new to the tokenizer, train beside '
             f'peft={model_config.peft} (trainable_tokens={",".join(map(str, ids))})')
    return dataclasses.replace(model_config, trainable_tokens=','.join(map(str, ids)))

  def load_data(self):
    """The conversations are read in __init__: bad data stops the run before it writes."""

  def _read_conversations(self):
    examples = chat.read_examples(self.config.data)
    n_val = held_out_count(len(examples), 'conversations', self.config)
    encoded = [chat.encode_conversation(self.template, self.tokenizer, example.messages,
                                        where=example.where) for example in examples]
    self.train, self.val = encoded[:-n_val], encoded[-n_val:]
    trained = sum(int(np.sum(conversation.loss_mask)) for conversation in self.train)
    truncated = sft_batches.count_truncated(encoded, self.config.seq_len)
    self.log(f'{len(self.train)} training conversations ({trained:,} assistant tokens), '
             f'{len(self.val)} held out' + (f'; {truncated} longer than --seq_len+1 are cut '
                                             'to it' if truncated else ''))

  @property
  def packed(self) -> bool:
    """Whether rows hold several conversations. A prompt- or prefix-tuned model takes one per
    row: every packed segment would have to see its learned tokens, which a mask cannot say."""
    return self.model_config.peft not in UNPACKED_PEFTS

  def _unpacked(self, batch):
    """A batch of one conversation per row needs no segments: its padding comes after it."""
    if self.packed:
      return batch
    return {key: value for key, value in batch.items() if key not in ('segment_ids', 'positions')}

  def train_batch(self, step: int):
    return self._unpacked(sft_batches.train_batch(
        self.train, seed=self.config.seed, step=step, batch_size=self.config.batch_size,
        seq_len=self.config.seq_len, packed=self.packed))

  def loss(self, model, batch, dropout_key, frozen=None):
    del frozen
    logits_btv = model(batch['inputs'], positions_bt=batch.get('positions'),
                       segment_ids_bt=batch.get('segment_ids'), dropout_key=dropout_key)
    loss, count = masked_cross_entropy(logits_btv, batch['targets'], batch['loss_mask'])
    return loss, {'loss': loss, 'trained_tokens': count}

  def evaluate(self, graphdef, params):
    """The mean cross-entropy of every held-out assistant token (all of the held-out
    conversations, whatever --eval_batches says)."""
    if graphdef not in self._eval_steps:

      def sums(params, batch):
        metrics = self.loss(nnx.merge(graphdef, params), batch, None)[1]
        return metrics['loss'] * metrics['trained_tokens'], metrics['trained_tokens']

      self._eval_steps[graphdef] = jax.jit(sums)
    put_batch = self.put_batch or (lambda batch: jax.tree.map(jnp.asarray, batch))
    total = count = 0.0
    for batch in sft_batches.eval_batches(self.val, batch_size=self.config.micro_batch_size,
                                          seq_len=self.config.seq_len, packed=self.packed):
      batch = self._unpacked(batch)
      batch_total, batch_count = jax.device_get(self._eval_steps[graphdef](
          params, put_batch(batch)))
      total, count = total + float(batch_total), count + float(batch_count)
    loss = total / max(count, 1.0)
    return {'eval_loss': loss, 'eval_ppl': float(np.exp(min(loss, 700))),
            'eval_tokens': count}
