"""Supervised fine-tuning: the masked loss, a run on synthetic chats, bad data."""
import json
import os

import jax.numpy as jnp
import numpy as np
import pytest

from conftest import small_config
from lmlab.data.chat import encode_conversation
from lmlab.data.chat_template import chat_template, render
from lmlab.data.errors import DataError
from lmlab.models.generation import SamplingConfig
from lmlab.training import run as run_lib
from lmlab.training.config import TrainConfig
from lmlab.training.language_modeling import load_run_tokenizer
from lmlab.training.loop import train
from lmlab.training.optimizer import OptimizerConfig
from lmlab.training.sft import SupervisedFineTuning, masked_cross_entropy

LETTERS = 'abcdefgh'


def test_masked_cross_entropy_is_the_mean_over_trained_tokens(rng):
  logits = rng.normal(size=(3, 7, 11)).astype(np.float32) * 3
  targets = rng.integers(0, 11, (3, 7))
  mask = rng.random((3, 7)) < 0.4
  mask[0, 0] = True
  log_probs = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
  picked = -np.take_along_axis(log_probs, targets[..., None], -1)[..., 0]
  loss, count = masked_cross_entropy(jnp.asarray(logits), jnp.asarray(targets),
                                     jnp.asarray(mask))
  np.testing.assert_allclose(loss, picked[mask].mean(), rtol=1e-5)
  assert count == mask.sum()
  # A target the mask leaves out does not move the loss.
  untrained = np.argwhere(~mask)[0]
  changed = targets.copy()
  changed[tuple(untrained)] = (changed[tuple(untrained)] + 1) % 11
  np.testing.assert_allclose(masked_cross_entropy(jnp.asarray(logits), jnp.asarray(changed),
                                                  jnp.asarray(mask))[0], loss, rtol=1e-6)


def copy_chats(rng, n: int) -> list[dict]:
  """Conversations in which the assistant repeats the user's word."""
  words = [''.join(rng.choice(list(LETTERS), rng.integers(2, 5))) for _ in range(n)]
  return [{'messages': [{'role': 'user', 'content': word},
                        {'role': 'assistant', 'content': word}]} for word in words]


def write_jsonl(path, examples):
  path.write_text(''.join(json.dumps(example) + '\n' for example in examples), encoding='utf-8')
  return str(path)


def test_sft_learns_to_answer_in_the_template_format(tmp_path, rng):
  """A model pre-trained on plain text (words of the task's letters), fine-tuned on chats in
  which the assistant repeats the user's word, answers a new word in ChatML's format."""
  corpus = tmp_path / 'corpus'
  corpus.mkdir()
  for i in range(4):
    (corpus / f'{i}.txt').write_text(' '.join(''.join(rng.choice(list(LETTERS), 3))
                                              for _ in range(3000)), encoding='utf-8')
  model = small_config(vocab_size=0, d_model=64, n_heads=4, n_kv_heads=4, ffn_dim=128)
  quiet = dict(print_fn=lambda *_: None)
  common = dict(batch_size=16, seq_len=48, eval_every=1000, save_every=1000,
                seed=int(rng.integers(1000)))
  train(TrainConfig(workdir=str(tmp_path / 'base'), data=str(corpus), steps=40, **common),
        model, OptimizerConfig(learning_rate=3e-3, warmup_steps=5, total_steps=40), **quiet)

  model, tokenizer_spec, init_params = run_lib.init_from(str(tmp_path / 'base'), [])
  data = write_jsonl(tmp_path / 'chats.jsonl', copy_chats(rng, 400))
  config = TrainConfig(workdir=str(tmp_path / 'sft'), objective='sft', data=data, steps=60,
                       val_fraction=0.05, tokenizer=tokenizer_spec, **common)
  optimizer = OptimizerConfig(learning_rate=3e-3, warmup_steps=10, total_steps=60)
  params, graphdef, tokenizer, summary = train(config, model, optimizer,
                                               init_params=init_params, **quiet)
  assert summary['eval_loss'] < 0.5 * summary['initial_eval_loss']
  words = [''.join(rng.choice(list(LETTERS), 3)) for _ in range(8)]
  answers = [run_lib.chat_reply(graphdef, params, tokenizer, chat_template('chatml'),
                                [{'role': 'user', 'content': word}],
                                SamplingConfig(max_new_tokens=8, temperature=0.0), seed=0)
             for word in words]
  # A reply is a word of the task's letters and then the end-of-turn token (without it the
  # reply would run to max_new_tokens).
  assert all(1 <= len(answer) < 8 and set(answer) <= set(LETTERS) for answer in answers), (
      words, answers)


def test_sft_trains_only_on_assistant_tokens(tmp_path, rng):
  """A run's batch holds the template's rendering of its conversations, with the loss mask on
  exactly the tokens the assistant turns (and their end tokens) encode to."""
  examples = copy_chats(rng, 20)
  data = write_jsonl(tmp_path / 'chats.jsonl', examples)
  config = TrainConfig(workdir=str(tmp_path / 'run'), objective='sft', data=data,
                       chat_template='llama3', seq_len=32).resolved(small_config())
  tokenizer = load_run_tokenizer(config)
  template = chat_template('llama3')
  for example in examples[:3]:
    messages = example['messages']
    ids, mask = encode_conversation(template, tokenizer, messages)
    whole = tokenizer.encode(render(template, messages), allowed_special='all')
    assert ids.tolist() == whole
    reply = tokenizer.encode(messages[1]['content'] + '<|eot_id|>', allowed_special='all')
    assert ids[mask].tolist() == reply


@pytest.mark.parametrize('line, problem', [
    ('{"messages": [{"role": "user", "content": "hi"}]}', 'assistant'),
    ('not json', 'JSON'),
    ('{"messages": [{"role": "robot", "content": "hi"}]}', 'robot'),
])
def test_bad_chat_line_is_one_error_naming_file_and_line(tmp_path, rng, line, problem):
  good = json.dumps(copy_chats(rng, 1)[0])
  path = tmp_path / 'chats.jsonl'
  path.write_text(f'{good}\n{good}\n{line}\n', encoding='utf-8')
  config = TrainConfig(workdir=str(tmp_path / 'run'), objective='sft', data=str(path),
                       steps=1)
  with pytest.raises(DataError, match=f'{path}:3.*{problem}|{problem}.*{path}:3'):
    train(config, small_config(vocab_size=0), OptimizerConfig(), print_fn=lambda *_: None)
  assert not os.listdir(tmp_path / 'run')


def test_prompt_tuning_takes_one_conversation_per_row(tmp_path, rng):
  """A prompt-tuned model cannot show its virtual tokens to several packed segments, so SFT
  gives it one conversation per row, padded after it."""
  examples = copy_chats(rng, 30)
  data = write_jsonl(tmp_path / 'chats.jsonl', examples)
  model = small_config(vocab_size=0, peft='prompt', prompt_tokens=2)
  config = TrainConfig(workdir=str(tmp_path / 'run'), objective='sft', data=data, steps=2,
                       batch_size=4, seq_len=32, eval_every=1000, save_every=1000)
  summary = train(config, model, OptimizerConfig(learning_rate=1e-2), print_fn=lambda *_: None)[3]
  assert np.isfinite(summary['eval_loss'])
  task = SupervisedFineTuning(config.resolved(model), model, log=lambda *_: None)
  conversations = {tuple(c.token_ids[:-1].tolist()) for c in task.train}
  batch = task.train_batch(int(rng.integers(1000)))
  assert 'segment_ids' not in batch
  for inputs, mask in zip(batch['inputs'], batch['loss_mask']):
    length = len(np.trim_zeros(inputs, 'b'))
    assert tuple(inputs[:length].tolist()) in conversations
    assert not mask[length:].any()


def test_under_peft_the_rows_of_template_tokens_new_to_the_tokenizer_train(tmp_path, rng):
  """ChatML's two tokens are new to the byte tokenizer: under LoRA their rows train too,
  unless trainable_tokens lists others; Llama-3's template adds its own tokens."""
  data = write_jsonl(tmp_path / 'chats.jsonl', copy_chats(rng, 10))
  for template, fields, expected in [
      ('chatml', {}, ['<|im_start|>', '<|im_end|>']),
      ('llama3', {}, ['<|begin_of_text|>', '<|start_header_id|>', '<|end_header_id|>',
                      '<|eot_id|>']),
      ('chatml', dict(trainable_tokens='3'), None),
      ('chatml', dict(peft=''), None)]:
    model = small_config(vocab_size=0, **{'peft': 'lora', **fields})
    config = TrainConfig(workdir=str(tmp_path / template), objective='sft', data=data,
                         chat_template=template, seq_len=32).resolved(model)
    task = SupervisedFineTuning(config, model, log=lambda *_: None)
    tokenizer = load_run_tokenizer(config)
    ids = (model.trainable_tokens if expected is None else
           ','.join(str(tokenizer.encode_single_token(token)) for token in expected))
    assert task.model_config.trainable_tokens == ids, (template, fields)
