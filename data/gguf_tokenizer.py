"""The tokenizer and chat template stored in a GGUF file's metadata, read and written.

A byte-level BPE vocabulary (tokenizer.ggml.model 'gpt2': Llama-3, Qwen2, SmolLM) becomes the
tokenizer.json it was converted from, which data/hf_tokenizer.py turns into tiktoken ranks:
the tokens in id order, the merges, CONTROL tokens as special added tokens, and the
pre-tokeniser that tokenizer.ggml.pre names, as transformers' GGUF loader chooses it (the
Llama-3 or Qwen2 split, else GPT-2's). SentencePiece vocabularies (tokenizer.ggml.model
'llama': Llama-2, Mistral) are not read yet.
"""
import functools
import os

import tiktoken

from lmlab.data import bpe, hf_tokenizer
from lmlab.data.errors import DataError

LLAMA3_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
                r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
QWEN2_SPLIT = LLAMA3_SPLIT.replace(r'\p{N}{1,3}', r'\p{N}')
# tokenizer.ggml.pre -> its pre-tokenisation regex (None: GPT-2's, ByteLevel's own; smollm
# as transformers reads it); any other value is refused.
SPLITS = {**dict.fromkeys(('llama3', 'llama-v3', 'llama-bpe', 'smaug-bpe', 'dbrx'),
                          LLAMA3_SPLIT),
          **dict.fromkeys(('qwen2', 'deepseek-r1-qwen'), QWEN2_SPLIT),
          **dict.fromkeys((None, 'default', 'gpt-2', 'smollm'), None)}
# tokenizer.ggml.token_type of special tokens, and of added tokens that are not special.
CONTROL, USER_DEFINED = 3, 4


def read_metadata(path: str) -> dict:
  """The tokenizer.* metadata of a GGUF file (parsed once per version of the file: a real
  vocabulary takes seconds)."""
  try:
    stamp = os.stat(path).st_mtime_ns
  except OSError:
    raise DataError(f'{path} does not exist; pass a .gguf file') from None
  return _metadata(path, stamp)


@functools.lru_cache(maxsize=4)
def _metadata(path: str, stamp: int) -> dict:
  del stamp  # Part of the cache key only.
  try:
    import gguf
  except ImportError:
    raise DataError(f'{path} is a GGUF file, which needs the gguf package: pip install gguf '
                    "(or 'lmlab[gguf]')") from None
  try:
    reader = gguf.GGUFReader(path)
  except (ValueError, OSError, IndexError, KeyError) as error:
    raise DataError(f'{path} is not a readable GGUF file ({error}); it may be truncated') \
        from None
  return {name: field.contents() for name, field in reader.fields.items()
          if name.startswith('tokenizer.')}


def tokenizer_json(path: str, values: dict) -> dict:
  """The tokenizer.json of a byte-level BPE vocabulary in GGUF metadata `values`."""
  kind = values.get('tokenizer.ggml.model')
  if kind != 'gpt2':
    raise DataError(f'{path}: tokenizer.ggml.model {kind!r} is not read yet (only byte-level '
                    "BPE, 'gpt2'); pass --tokenizer=<the model's tokenizer.json>")
  tokens = values.get('tokenizer.ggml.tokens')
  types = values.get('tokenizer.ggml.token_type') or []
  if not isinstance(tokens, list) or not tokens:
    raise DataError(f'{path} has no tokenizer.ggml.tokens')
  pre = values.get('tokenizer.ggml.pre')
  if pre not in SPLITS:
    raise DataError(f'{path}: tokenizer.ggml.pre {pre!r} names a pre-tokeniser not read here '
                    f'(those read: {", ".join(str(name) for name in SPLITS if name)}); pass '
                    "--tokenizer=<the model's tokenizer.json>")
  split = SPLITS[pre]
  byte_level = {'type': 'ByteLevel', 'add_prefix_space': False, 'trim_offsets': True,
                'use_regex': split is None}
  pre_tokenizer = byte_level if split is None else {'type': 'Sequence', 'pretokenizers': [
      {'type': 'Split', 'pattern': {'Regex': split}, 'behavior': 'Isolated', 'invert': False},
      byte_level]}
  return {
      'model': {'type': 'BPE', 'vocab': {token: i for i, token in enumerate(tokens)},
                'merges': values.get('tokenizer.ggml.merges') or [], 'unk_token': None},
      'pre_tokenizer': pre_tokenizer,
      'added_tokens': [{'id': i, 'content': tokens[i], 'special': kind == CONTROL}
                       for i, kind in enumerate(types) if kind in (CONTROL, USER_DEFINED)],
  }


def load(path: str):
  """The tiktoken Encoding of the GGUF file's vocabulary."""
  return hf_tokenizer.encoding_from_tokenizer_json(
      path, name=os.path.splitext(os.path.basename(path))[0],
      config=tokenizer_json(path, read_metadata(path)))


# Our pre-tokenisation regexes and the tokenizer.ggml.pre that names each.
PRE_NAMES = {bpe.GPT2_PATTERN: 'gpt-2', LLAMA3_SPLIT: 'llama-bpe', QWEN2_SPLIT: 'qwen2'}
NORMAL, UNUSED = 1, 5


def _merges(ranks: dict[bytes, int], spelled) -> list[str]:
  """The merge that makes each token of more than one byte, in rank order: its bytes merged as
  BPE merges them with the ranks below its own, which ends in the two tokens it joins."""
  merges = []
  for token, rank in sorted(ranks.items(), key=lambda item: item[1]):
    if len(token) < 2:
      continue
    parts = [token[i:i + 1] for i in range(len(token))]
    while len(parts) > 2:
      best, at = min((ranks.get(a + b, rank), i) for i, (a, b) in enumerate(zip(parts,
                                                                                 parts[1:])))
      if best >= rank:
        break
      parts[at:at + 2] = [parts[at] + parts[at + 1]]
    if len(parts) != 2 or any(part not in ranks for part in parts):
      raise DataError(f'vocabulary token {token!r} is not the merge of two earlier tokens, '
                      'which GGUF needs')
    merges.append(f'{spelled(parts[0])} {spelled(parts[1])}')
  return merges


def metadata_of(tokenizer, n_vocab: int, *, bos_token: int, eos_token: int,
                chat_template: str | None) -> dict:
  """The GGUF tokenizer metadata of a byte-level BPE tokenizer (tiktoken Encoding) for a
  model of n_vocab ids: ids no token has are UNUSED placeholders. bos_token is written
  (llama.cpp would otherwise pick one) but not added to prompts."""
  if not isinstance(tokenizer, tiktoken.Encoding):
    raise DataError(f'GGUF export writes byte-level BPE tokenizers; {tokenizer.name!r} is not '
                    'one')
  pre = PRE_NAMES.get(tokenizer._pat_str)
  if pre is None:
    raise DataError(f'the pre-tokenisation pattern of {tokenizer.name!r} has no GGUF name '
                    f'(those written: GPT-2, Llama-3 and Qwen2 splits)')
  if tokenizer.n_vocab > n_vocab:
    raise DataError(f'tokenizer {tokenizer.name!r} has {tokenizer.n_vocab} ids, more than the '
                    f'model\'s vocabulary of {n_vocab} (chat tokens added without growing the '
                    'embedding?)')
  ranks = getattr(tokenizer, 'ordinary_ranks', tokenizer._mergeable_ranks)
  spelled = lambda token: ''.join(hf_tokenizer.STAND_IN_OF_BYTE[b] for b in token)
  tokens = [f'[UNUSED{i}]' for i in range(n_vocab)]
  types = [UNUSED] * n_vocab
  for token, token_id in ranks.items():
    tokens[token_id], types[token_id] = spelled(token), NORMAL
  for token, token_id in tokenizer._special_tokens.items():
    tokens[token_id], types[token_id] = token, CONTROL
  values = {'tokenizer.ggml.model': 'gpt2', 'tokenizer.ggml.pre': pre,
            'tokenizer.ggml.tokens': tokens, 'tokenizer.ggml.token_type': types,
            'tokenizer.ggml.merges': _merges(ranks, spelled),
            # Unused by byte-level BPE, but transformers' reader of a vocabulary without
            # merges (the byte tokenizer's) asks for them.
            'tokenizer.ggml.scores': [0.0] * n_vocab,
            'tokenizer.ggml.bos_token_id': bos_token,
            'tokenizer.ggml.eos_token_id': eos_token,
            'tokenizer.ggml.add_bos_token': False}
  if chat_template:
    values['tokenizer.chat_template'] = chat_template
  return values
