"""Chat examples for supervised fine-tuning: reading them, and their tokens with a loss mask.

An examples file is JSONL, one example per line: {"messages": [{"role": "system" | "user" |
"assistant", "content": str}, ...]}, or {"prompt": str, "completion": str}, which is a user
turn and an assistant turn. Other keys of an example are ignored; a message has exactly
`role` and `content`, since a template might render any other key.

`encode_conversation` renders a conversation with a chat template and trains on the
assistant's part of it: each reply and the end token after it, as the template renders them.
That part is what the template adds to a conversation already rendered up to the reply with
the generation prompt, and it is encoded on its own, as the reply would be generated after
that prompt. The special-token strings of the template encode as their special ids wherever
they appear, in message contents too, as in transformers' apply_chat_template.
"""
import json
import typing

import numpy as np
import tiktoken

from lmlab.data import arithmetic, bpe
from lmlab.data.chat_template import ChatTemplate, render
from lmlab.data.errors import DataError
from lmlab.data.files import read_lines
from lmlab.data.hf_library_tokenizer import LibraryTokenizer

ROLES = ('system', 'user', 'assistant')


class Example(typing.NamedTuple):
  messages: list[dict]
  where: str  # 'path:line', for errors


class EncodedConversation(typing.NamedTuple):
  token_ids: np.ndarray  # int32 [N]
  loss_mask: np.ndarray  # bool [N]: True on the tokens trained on


def _messages(where: str, example) -> list[dict]:
  """The messages of one parsed JSONL line."""
  if not isinstance(example, dict):
    raise DataError(f'{where}: the example is a JSON {type(example).__name__}, not an object')
  if 'messages' in example:
    if 'prompt' in example or 'completion' in example:
      raise DataError(f'{where}: the example has both "messages" and "prompt"/"completion"; '
                      'give one of them')
    messages = example['messages']
  elif isinstance(example.get('prompt'), str) and isinstance(example.get('completion'), str):
    messages = [{'role': 'user', 'content': example['prompt']},
                {'role': 'assistant', 'content': example['completion']}]
  else:
    raise DataError(f'{where}: the example has no "messages" list and no "prompt" and '
                    '"completion" strings')
  checked_messages(where, messages)
  if not any(message['role'] == 'assistant' for message in messages):
    raise DataError(f'{where}: the conversation has no assistant turn to train on')
  return messages


def checked_messages(where: str, messages, key: str = 'messages') -> list[dict]:
  """`messages`, the value of an example's `key`, if it is a list of messages."""
  if not isinstance(messages, list):
    raise DataError(f'{where}: "{key}" is a JSON {type(messages).__name__}, not a list')
  for index, message in enumerate(messages):
    if not (isinstance(message, dict) and message.keys() == {'role', 'content'}
            and isinstance(message['content'], str)):
      raise DataError(f'{where}: message {index} of "{key}" is {json.dumps(message)[:60]}, not '
                      'an object of exactly a "role" and a "content" string')
    if message['role'] not in ROLES:
      raise DataError(f'{where}: message {index} of "{key}" has the role '
                      f'{message["role"]!r}; roles are {", ".join(ROLES)}')
  return messages


def json_lines(path: str, what: str) -> list[tuple[str, object]]:
  """('path:line', the parsed value) of each line of a JSONL file of `what` (blank lines
  are skipped); an error names a line that is not JSON, or a file without any."""
  values = []
  for number, line in enumerate(read_lines(path), 1):
    if not line.strip():
      continue
    where = f'{path}:{number}'
    try:
      values.append((where, json.loads(line)))
    except (ValueError, RecursionError) as error:
      raise DataError(f'{where}: not JSON ({error})') from None
  if not values:
    raise DataError(f'{path} holds no {what}; pass a JSONL file of them')
  return values


def read_examples(path: str) -> list[Example]:
  """The examples of a JSONL file, in order (blank lines are skipped), or of the synthetic
  task data/arithmetic.py (path synthetic:arithmetic)."""
  if path == arithmetic.SYNTHETIC:
    lines = [(f'{path} problem {i}', example)
             for i, example in enumerate(arithmetic.sft_examples())]
  else:
    lines = json_lines(path, 'chat examples')
  return [Example(_messages(where, parsed), where) for where, parsed in lines]


def _special_tokens_of(tokenizer) -> set[str]:
  if not hasattr(tokenizer, 'special_tokens_set'):
    raise DataError(f'chat templates need a byte-level BPE tokenizer or a tokenizer.json; '
                    f'{tokenizer.name!r} is neither')
  return tokenizer.special_tokens_set


def with_special_tokens(tokenizer: tiktoken.Encoding, tokens) -> tuple[tiktoken.Encoding,
                                                                       list[str]]:
  """(the tokenizer with each of `tokens` a special token, those it had to add).

  Added tokens take new ids after the largest id, in the order given; the model's embedding
  must grow to the new tokenizer's n_vocab. Without any to add, the tokenizer is returned as is.
  """
  present = _special_tokens_of(tokenizer)
  added = [token for token in dict.fromkeys(tokens) if token not in present]
  if not added:
    return tokenizer, []
  first = tokenizer.max_token_value + 1
  new_tokens = {token: first + i for i, token in enumerate(added)}
  if isinstance(tokenizer, LibraryTokenizer):
    return tokenizer.with_special_tokens(new_tokens), added
  extended = bpe.with_special_tokens(tokenizer, {**tokenizer._special_tokens, **new_tokens},
                                     source=f'tokenizer {tokenizer.name!r} with chat tokens')
  return extended, added


def _trained_spans(template: ChatTemplate, messages, where: str, trained_from: int):
  """(rendered text, [(start, end)] of the trained part of each assistant turn from message
  `trained_from` on)."""
  text = render(template, messages, where=where)
  spans, previous_end = [], 0
  for index, message in enumerate(messages):
    if message['role'] != 'assistant' or index < trained_from:
      continue
    prompt = render(template, messages[:index], add_generation_prompt=True, where=where)
    through = render(template, messages[:index + 1], where=where)
    if not (text.startswith(through) and through.startswith(prompt)
            and len(prompt) >= previous_end):
      raise DataError(f'chat template {template.name!r} does not render {where} up to '
                      f'message {index} as the start of its whole rendering, so the assistant '
                      'turns cannot be told apart for the loss mask')
    # What follows the turn's last end token (a newline, say) is context, not reply.
    end_in_turn = through.rfind(template.end_token, len(prompt))
    end = len(through) if end_in_turn < 0 else end_in_turn + len(template.end_token)
    spans.append((len(prompt), end))
    previous_end = len(through)
  return text, spans


def encode_conversation(template: ChatTemplate, tokenizer: tiktoken.Encoding, messages, *,
                        where: str = 'the conversation',
                        trained_from: int = 0) -> EncodedConversation:
  """The tokens of `messages` rendered with `template`, True in the loss mask on each assistant
  turn's content and end token (see the module docstring), from message `trained_from` on.
  `where` names them in errors."""
  specials = set(template.special_tokens)
  missing = sorted(specials - _special_tokens_of(tokenizer))
  if missing:
    raise DataError(f'tokenizer {tokenizer.name!r} lacks the special tokens {missing} of chat '
                    f'template {template.name!r}; add them with '
                    'lmlab.data.chat.with_special_tokens (and grow the embedding to match)')
  text, spans = _trained_spans(template, messages, where, trained_from)
  boundaries = [0, *(offset for span in spans for offset in span), len(text)]
  ids, mask = [], []
  for piece, (start, end) in enumerate(zip(boundaries, boundaries[1:])):
    piece_ids = tokenizer.encode(text[start:end], allowed_special=specials, disallowed_special=())
    ids += piece_ids
    mask += [piece % 2 == 1] * len(piece_ids)
  return EncodedConversation(np.asarray(ids, np.int32), np.asarray(mask, bool))
