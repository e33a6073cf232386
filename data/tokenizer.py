"""Tokenizers are `tiktoken.Encoding`s built from local ranks; nothing is downloaded.

`load_tokenizer(spec)` maps a `--tokenizer` value to an Encoding. Today: 'bytes', the
256 single-byte ranks plus special tokens, which round-trips any UTF-8 text exactly.
Trained BPE vocabularies and `.tiktoken` files plug in here as further specs.
"""
import tiktoken

from data import DataError

END_OF_TEXT = '<|endoftext|>'
# GPT-2's pre-tokenisation pattern. With byte ranks only it changes nothing in the output;
# it is here so a BPE vocabulary trained later splits text the same way.
GPT2_PATTERN = r"""'(?:[sdmt]|ll|ve|re)| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""


def byte_tokenizer() -> tiktoken.Encoding:
  return tiktoken.Encoding(
      name='bytes', pat_str=GPT2_PATTERN,
      mergeable_ranks={bytes([i]): i for i in range(256)},
      special_tokens={END_OF_TEXT: 256})


TOKENIZERS = {'bytes': byte_tokenizer}


def load_tokenizer(spec: str) -> tiktoken.Encoding:
  if spec not in TOKENIZERS:
    raise DataError(f'unknown tokenizer {spec!r}; choose one of {", ".join(TOKENIZERS)}')
  return TOKENIZERS[spec]()
