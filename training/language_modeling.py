"""Next-token prediction on a tokenised corpus, and the run's data it is made of: the
tokenizer, the token cache, the vocabulary the model takes from it, and the mean loss over
held-out windows.
"""
import dataclasses
import math
import os

import jax
import jax.numpy as jnp
import numpy as np

from lmlab.data import batches as batches_lib
from lmlab.data import chat
from lmlab.data import corpus as corpus_lib
from lmlab.data import token_cache
from lmlab.data import tokenizer as tokenizer_lib
from lmlab.data.chat_template import chat_template
from lmlab.models.config import ModelConfig
from lmlab.models.errors import ConfigError
from lmlab.training import steps as steps_lib
from lmlab.training.config import TrainConfig
from lmlab.training.objective import Objective


def tokenizer_dir(workdir: str) -> str:
  return os.path.join(workdir, 'tokenizer')


def load_run_tokenizer(train_config: TrainConfig, splits=None):
  """The run's tokenizer; a trainable spec is trained on the training split once. With a
  chat template, the template's special tokens are special tokens of it (added after the
  largest id where missing, so the same ids each time)."""
  tokenizer = tokenizer_lib.load_tokenizer(
      train_config.tokenizer, cache_dir=tokenizer_dir(train_config.workdir),
      train_texts=None if splits is None else lambda: corpus_lib.texts_of(splits['train']),
      pattern=train_config.tokenizer_pattern, expected_sha256=train_config.tokenizer_sha256)
  if train_config.chat_template:
    template = chat_template(train_config.chat_template)
    tokenizer, _ = chat.with_special_tokens(tokenizer, template.special_tokens)
  return tokenizer


def tokenize(train_config: TrainConfig, tokenizer, splits, *, log=print,
             scratch: str | None = None):
  """{split name: token memmap}, from the workdir's cache when it holds them. scratch: a
  folder that takes the caches made here, so that nothing is written into the workdir."""
  identity = tokenizer_lib.fingerprint(train_config.tokenizer,
                                       tokenizer_dir(train_config.workdir))
  cache_root = os.path.join(train_config.workdir, 'tokens')
  if scratch is not None:
    _link_complete_caches(cache_root, scratch)
    cache_root = scratch
  return token_cache.load_splits(splits, tokenizer, cache_root, tokenizer_id=identity, log=log)


def _link_complete_caches(cache_root: str, scratch: str):
  """Links into scratch the caches of cache_root that are complete: those with the meta.json
  that data/token_cache.py writes last (a partial one may be a running training's)."""
  if not os.path.isdir(cache_root):
    return
  for name in os.listdir(cache_root):
    folder = os.path.join(os.path.abspath(cache_root), name)
    if os.path.exists(os.path.join(folder, 'meta.json')):
      os.symlink(folder, os.path.join(scratch, name))


def resolve_vocab(model_config: ModelConfig, tokenizer) -> ModelConfig:
  """vocab_size=0 means the tokenizer's, rounded up to a multiple of 64."""
  if model_config.vocab_size:
    return model_config
  return dataclasses.replace(model_config, vocab_size=-(-tokenizer.n_vocab // 64) * 64)


def _token_bytes(tokenizer, token: int) -> bytes | None:
  try:
    return tokenizer.decode_single_token_bytes(token)
  except KeyError:  # An id no token has (tiktoken leaves gaps below special tokens).
    return None


def check_same_vocabulary(config: ModelConfig, other_config: ModelConfig, tokenizer,
                          other_tokenizer, other: str):
  """Refuses a second model (a draft, a teacher) whose token ids do not mean this one's:
  another vocabulary size, or another token at any id."""
  if other_config.family != 'decoder' or other_config.n_labels:
    raise ConfigError(f'{other} is not a language-model decoder')
  same = (config.vocab_size == other_config.vocab_size
          and tokenizer.n_vocab == other_tokenizer.n_vocab
          and all(_token_bytes(tokenizer, i) == _token_bytes(other_tokenizer, i)
                  for i in range(tokenizer.n_vocab)))
  if not same:
    raise ConfigError(f'{other} has another tokenizer or vocabulary (vocab_size '
                      f'{other_config.vocab_size}, {other_tokenizer.n_vocab} tokens) than this '
                      f'model ({config.vocab_size}, {tokenizer.n_vocab}); it must share the '
                      'tokenizer')


def check_fits(model_config: ModelConfig, tokenizer, seq_len: int):
  if model_config.vocab_size < tokenizer.n_vocab:
    raise ConfigError(f'vocab_size={model_config.vocab_size} is smaller than the tokenizer\'s '
                      f'{tokenizer.n_vocab} tokens; --set vocab_size={tokenizer.n_vocab} or more')
  model_config.check_positions(seq_len, '--seq_len',
                               f'lower --seq_len or --set max_seq_len={seq_len}')


def end_token(train_config: TrainConfig, tokenizer):
  """The id that separates documents when they are masked from each other, else None."""
  return tokenizer_lib.separator_id(tokenizer) if train_config.document_masking else None


def evaluate_tokens(eval_step, params, tokens, *, batch_size: int, seq_len: int,
                    max_batches: int, end_token, put_batch=None):
  """Mean cross-entropy over evenly spaced windows of `tokens`; put_batch places a numpy
  batch on the devices (default: jnp.asarray)."""
  put_batch = put_batch or (lambda batch: jax.tree.map(jnp.asarray, batch))
  losses = [eval_step(params, put_batch(batch))
            for batch in batches_lib.eval_batches(tokens, batch_size=batch_size, seq_len=seq_len,
                                                  max_batches=max_batches, end_token=end_token)]
  return float(np.mean(jax.device_get(losses)))


class LanguageModeling(Objective):
  """Next-token prediction on a tokenised corpus (objective 'lm'), with the next-token loss
  of training/steps.py."""

  def __init__(self, train_config: TrainConfig, model_config: ModelConfig, *, log=print):
    self.config, self.log = train_config, log
    self.splits = corpus_lib.split_corpus(train_config.data, train_config.val_fraction)
    self.tokenizer = load_run_tokenizer(train_config, self.splits)
    self.model_config = resolve_vocab(model_config, self.tokenizer).validate()
    check_fits(self.model_config, self.tokenizer, train_config.seq_len)
    self.separator = end_token(train_config, self.tokenizer)
    self._eval_steps = {}

  def load_data(self):
    self.data = tokenize(self.config, self.tokenizer, self.splits, log=self.log)
    batches_lib.check_length(self.data['train'], self.config.seq_len, 'train')
    batches_lib.check_length(self.data['val'], self.config.seq_len, 'validation')

  def train_batch(self, step: int):
    return batches_lib.train_batch(self.data['train'], seed=self.config.seed, step=step,
                                   batch_size=self.config.batch_size,
                                   seq_len=self.config.seq_len, end_token=self.separator)

  def evaluate(self, graphdef, params):
    if graphdef not in self._eval_steps:
      self._eval_steps[graphdef] = steps_lib.make_eval_step(graphdef)
    loss = evaluate_tokens(self._eval_steps[graphdef], params, self.data['val'],
                           batch_size=self.config.micro_batch_size, seq_len=self.config.seq_len,
                           max_batches=self.config.eval_batches, end_token=self.separator,
                           put_batch=self.put_batch)
    return {'eval_loss': loss, 'eval_ppl': math.exp(min(loss, 700))}
