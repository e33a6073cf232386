"""The tokenizer and chat template stored in a GGUF file's metadata.

A byte-level BPE vocabulary (tokenizer.ggml.model 'gpt2': Llama-3, Qwen2, SmolLM) becomes the
tokenizer.json it was converted from, which data/hf_tokenizer.py turns into tiktoken ranks:
the tokens in id order, the merges, CONTROL tokens as special added tokens, and the
pre-tokeniser that tokenizer.ggml.pre names, as transformers' GGUF loader chooses it (the
Llama-3 or Qwen2 split, else GPT-2's). SentencePiece vocabularies (tokenizer.ggml.model
'llama': Llama-2, Mistral) are not read yet.
"""
import os

from lmlab.data import hf_tokenizer
from lmlab.data.errors import DataError

LLAMA3_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
                r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
QWEN2_SPLIT = LLAMA3_SPLIT.replace(r'\p{N}{1,3}', r'\p{N}')
# tokenizer.ggml.pre -> its pre-tokenisation regex; any other value: GPT-2's.
SPLITS = {**dict.fromkeys(('llama3', 'llama-v3', 'llama-bpe', 'smaug-bpe', 'dbrx'),
                          LLAMA3_SPLIT),
          **dict.fromkeys(('qwen2', 'deepseek-r1-qwen'), QWEN2_SPLIT)}
CONTROL = 3  # tokenizer.ggml.token_type of special tokens.


def read_metadata(path: str) -> dict:
  try:
    import gguf
  except ImportError:
    raise DataError(f'{path} is a GGUF file, which needs the gguf package: pip install gguf '
                    "(or 'lmlab[gguf]')") from None
  if not os.path.isfile(path):
    raise DataError(f'{path} does not exist; pass a .gguf file')
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
  split = SPLITS.get(values.get('tokenizer.ggml.pre'))
  byte_level = {'type': 'ByteLevel', 'add_prefix_space': False, 'trim_offsets': True,
                'use_regex': split is None}
  pre_tokenizer = byte_level if split is None else {'type': 'Sequence', 'pretokenizers': [
      {'type': 'Split', 'pattern': {'Regex': split}, 'behavior': 'Isolated', 'invert': False},
      byte_level]}
  return {
      'model': {'type': 'BPE', 'vocab': {token: i for i, token in enumerate(tokens)},
                'merges': values.get('tokenizer.ggml.merges') or [], 'unk_token': None},
      'pre_tokenizer': pre_tokenizer,
      'added_tokens': [{'id': i, 'content': tokens[i], 'special': True}
                       for i, kind in enumerate(types) if kind == CONTROL],
  }


def load(path: str):
  """The tiktoken Encoding of the GGUF file's vocabulary."""
  return hf_tokenizer.encoding_from_tokenizer_json(
      path, name=os.path.splitext(os.path.basename(path))[0],
      config=tokenizer_json(path, read_metadata(path)))


def chat_template(path: str) -> str | None:
  return read_metadata(path).get('tokenizer.chat_template')
