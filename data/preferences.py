"""Preference pairs: a prompt with a chosen and a rejected reply, for reward models and DPO.

A pairs file is JSONL, one pair per line: {"prompt": str, "chosen": str, "rejected": str}, or
TRL's conversational form, {"prompt": [messages], "chosen": [messages], "rejected":
[messages]}, where each reply's messages continue the prompt's conversation (an assistant
turn, usually one). An optional "margin" (a number >= 0) asks a reward model to score the
chosen reply at least that much above the rejected one (Llama 2's margin loss). Other keys
are ignored. --data=synthetic:arithmetic gives data/arithmetic.py's pairs instead.

Each side of a pair encodes as its prompt and reply rendered with the chat template, with the
loss mask on the reply's assistant turns, and ends at the reply's last trained token (its
end-of-turn token), where a reward model reads its score. A batch holds, for each side s in
('chosen', 'rejected'), s_tokens and s_mask [B, T] (padding: token 0, mask 0) and s_length
[B], with 'margin' and 'weight' [B] (0 on the padding rows of an evaluation batch).
"""
import numbers
import typing

import numpy as np

from lmlab.data import arithmetic, chat
from lmlab.data.errors import DataError

SIDES = ('chosen', 'rejected')


class PreferencePair(typing.NamedTuple):
  chosen: chat.EncodedConversation
  rejected: chat.EncodedConversation
  margin: float
  where: str


def _reply(where: str, example: dict, key: str) -> list[dict]:
  if key not in example:
    raise DataError(f'{where}: the pair has no "{key}" reply')
  reply = example[key]
  if isinstance(reply, str):
    reply = [{'role': 'assistant', 'content': reply}]
  reply = chat.checked_messages(where, reply, key)
  if not any(m['role'] == 'assistant' and m['content'].strip() for m in reply):
    raise DataError(f'{where}: the "{key}" reply is empty; a pair needs two non-empty replies')
  return reply


def _pair(where: str, example) -> tuple[list[dict], list[dict], list[dict], float]:
  """(prompt messages, chosen reply, rejected reply, margin) of one parsed line."""
  if not isinstance(example, dict):
    raise DataError(f'{where}: the pair is a JSON {type(example).__name__}, not an object')
  prompt = example.get('prompt')
  if isinstance(prompt, str):
    prompt = [{'role': 'user', 'content': prompt}]
  elif prompt is None:
    raise DataError(f'{where}: the pair has no "prompt"')
  prompt = chat.checked_messages(where, prompt, 'prompt')
  chosen, rejected = _reply(where, example, 'chosen'), _reply(where, example, 'rejected')
  if chosen == rejected:
    raise DataError(f'{where}: "chosen" and "rejected" are the same reply; a pair must differ')
  margin = example.get('margin', 0.0)
  if not (isinstance(margin, numbers.Real) and not isinstance(margin, bool)
          and 0.0 <= margin < float('inf')):
    raise DataError(f'{where}: "margin" is {margin!r:.40}, not a number >= 0')
  return prompt, chosen, rejected, float(margin)


def read_pairs(data: str):
  """[(where, prompt, chosen, rejected, margin)] of a pairs file (or synthetic:arithmetic),
  in order."""
  if data == arithmetic.SYNTHETIC:
    lines = [(f'{data} problem {i}', example)
             for i, example in enumerate(arithmetic.preference_examples())]
  else:
    lines = chat.json_lines(data, 'preference pairs')
  return [(where, *_pair(where, example)) for where, example in lines]


def _side(template, tokenizer, prompt, reply, where: str) -> chat.EncodedConversation:
  encoded = chat.encode_conversation(template, tokenizer, prompt + reply, where=where,
                                     trained_from=len(prompt))
  end = int(np.flatnonzero(encoded.loss_mask)[-1]) + 1
  return chat.EncodedConversation(encoded.token_ids[:end], encoded.loss_mask[:end])


def encode_pairs(pairs, template, tokenizer) -> list[PreferencePair]:
  """The PreferencePairs of read_pairs' pairs."""
  return [PreferencePair(_side(template, tokenizer, prompt, chosen, where),
                         _side(template, tokenizer, prompt, rejected, where), margin, where)
          for where, prompt, chosen, rejected, margin in pairs]


def fits(pair: PreferencePair, seq_len: int) -> bool:
  return max(len(pair.chosen.token_ids), len(pair.rejected.token_ids)) <= seq_len


def batch(pairs: list[PreferencePair], size: int, seq_len: int) -> dict:
  """The batch of `pairs` (each fitting seq_len), padded with weight-0 rows to `size`."""
  out = {'margin': np.zeros(size, np.float32), 'weight': np.zeros(size, np.float32)}
  for side in SIDES:
    out[f'{side}_tokens'] = np.zeros((size, seq_len), np.int32)
    out[f'{side}_mask'] = np.zeros((size, seq_len), np.int32)
    out[f'{side}_length'] = np.zeros(size, np.int32)
  for row, pair in enumerate(pairs):
    for side in SIDES:
      encoded = getattr(pair, side)
      n = len(encoded.token_ids)
      out[f'{side}_tokens'][row, :n] = encoded.token_ids
      out[f'{side}_mask'][row, :n] = encoded.loss_mask
      out[f'{side}_length'][row] = n
    out['margin'][row], out['weight'][row] = pair.margin, 1.0
  return out


def train_batch(pairs: list[PreferencePair], *, seed: int, step: int, batch_size: int,
                seq_len: int) -> dict:
  """batch_size pairs drawn at random (with replacement) from (seed, step)."""
  rng = np.random.default_rng([seed, step])
  return batch([pairs[i] for i in rng.integers(0, len(pairs), batch_size)], batch_size,
               seq_len)


def eval_batches(pairs: list[PreferencePair], *, batch_size: int, seq_len: int):
  """Yields batches holding every pair once, in order."""
  for start in range(0, len(pairs), batch_size):
    yield batch(pairs[start:start + batch_size], batch_size, seq_len)
