"""Tokenizers by name: `load_tokenizer(spec)` maps a `--tokenizer` value to a tokenizer.

Specs:
  bytes                         the 256 single-byte ranks plus <|endoftext|>: any UTF-8 text
                                round-trips exactly
  bpe:<size>[:<pattern>][:digits]
                                byte-level BPE trained on the run's training split once and
                                kept in the workdir (pattern gpt2 or cl100k; digits splits
                                numbers into single digits)
  wordpiece:<size>              a BERT WordPiece vocabulary trained the same way
  <path>.tiktoken               a tiktoken ranks file (pattern and special tokens from the
                                `<path>.json` beside it, or --tokenizer_pattern)
  <path>/tokenizer.json         a Hugging Face tokenizer: byte-level BPE converted to
                                tiktoken, any other kind (SentencePiece-style BPE, Unigram,
                                WordPiece) run by the `tokenizers` library
  <path>.gguf                   the byte-level BPE vocabulary of a GGUF file's metadata
  <path>.txt                    a BERT vocab.txt
Byte-level tokenizers are `tiktoken.Encoding`s; WordPiece and the `tokenizers` library's
(data/hf_library_tokenizer.py) offer the same methods (`encode_ordinary`, `decode`,
`encode_single_token`, `n_vocab`, `name`). Nothing is
downloaded: a missing file is an error saying what to pass.
"""
import os
import re

from lmlab.data import bpe, gguf_tokenizer, hf_tokenizer, wordpiece
from lmlab.data.errors import DataError
from lmlab.data.hf_library_tokenizer import LibraryTokenizer

END_OF_TEXT = '<|endoftext|>'
# Documents are separated by <|endoftext|>, by BERT's [SEP] in a WordPiece vocabulary, or by
# the end-of-sequence token of SentencePiece vocabularies (Llama-2, Mistral; Gemma's <eos>).
END_OF_SEQUENCE = ('</s>', '<eos>')  # Only as special tokens.
SEPARATORS = (END_OF_TEXT, '[SEP]', *END_OF_SEQUENCE)
TRAINED = re.compile(r'^(bpe|wordpiece):(\d+)(?::(gpt2|cl100k))?(:digits)?$')


def byte_tokenizer():
  return bpe.build_encoding('bytes', {bytes([i]): i for i in range(256)},
                            pattern=bpe.GPT2_PATTERN, special_tokens={END_OF_TEXT: 256},
                            source='the byte tokenizer')


def trained_path(spec: str, cache_dir: str) -> str:
  """Where a trained spec's vocabulary lives in a workdir."""
  kind = TRAINED.match(spec).group(1)
  safe = spec.replace(':', '-')
  return os.path.join(cache_dir, safe + ('.tiktoken' if kind == 'bpe' else '.txt'))


def train_tokenizer(spec: str, texts, path: str):
  """Trains the vocabulary `spec` (bpe:... or wordpiece:...) on `texts` and writes it to path."""
  match = TRAINED.match(spec)
  if not match:
    raise DataError(f'--tokenizer={spec!r} is not trainable; use bpe:<size>[:gpt2|:cl100k]'
                    '[:digits] or wordpiece:<size>')
  kind, size, pattern_name, digits = match.groups()
  if kind == 'wordpiece':
    if pattern_name or digits:
      raise DataError(f'--tokenizer={spec!r}: WordPiece takes no pattern; use wordpiece:<size>')
    pieces = wordpiece.train_wordpiece(texts, int(size), lowercase=True)
    wordpiece.WordPieceTokenizer(pieces, lowercase=True).save(path)
    return
  pattern = bpe.pretokenizer_pattern(pattern_name or 'gpt2', split_digits=bool(digits))
  ranks = bpe.train_bpe(texts, int(size), pattern=pattern, special_tokens=[END_OF_TEXT])
  bpe.save_tiktoken(ranks, path, pattern=pattern,
                    special_tokens=bpe.special_token_ids(ranks, [END_OF_TEXT]))


def source_file(spec: str, cache_dir: str | None):
  """The file a spec reads, or None for the built-in byte tokenizer."""
  if spec == 'bytes':
    return None
  if TRAINED.match(spec):
    if cache_dir is None:
      raise DataError(f'--tokenizer={spec!r} is trained per run; it needs a workdir')
    return trained_path(spec, cache_dir)
  return spec


def load_tokenizer(spec: str, *, cache_dir: str | None = None, train_texts=None,
                   pattern: str | None = None, expected_sha256: str | None = None):
  """The tokenizer of `spec`; a trainable spec is trained from train_texts() on first use.

  expected_sha256, when given, must be the hash of a .tiktoken file's contents.
  """
  path = source_file(spec, cache_dir)
  if path is None:
    return byte_tokenizer()
  if TRAINED.match(spec) and not os.path.exists(path):
    if train_texts is None:
      raise DataError(f'{path} does not exist: train the tokenizer first (run training, or '
                      f'--mode=tokenizer)')
    train_tokenizer(spec, train_texts(), path)
  if not os.path.isfile(path):
    raise DataError(f'--tokenizer={spec!r} is neither bytes, bpe:<size>, wordpiece:<size> nor '
                    'an existing .tiktoken, tokenizer.json, vocab.txt or .gguf file')
  if path.endswith('.gguf'):
    return gguf_tokenizer.load(path)
  if path.endswith('.json'):
    try:
      return hf_tokenizer.encoding_from_tokenizer_json(path)
    except hf_tokenizer.NotConvertible:
      return LibraryTokenizer(path)
  if path.endswith('.txt'):
    return wordpiece.WordPieceTokenizer(path, lowercase=True)
  if pattern is not None and pattern in bpe.PATTERNS:
    pattern = bpe.PATTERNS[pattern]
  return bpe.load_tiktoken(path, pattern=pattern, expected_sha256=expected_sha256)


def fingerprint(spec: str, cache_dir: str | None) -> str:
  """Identifies what the tokenizer of `spec` encodes to: the spec and its file's state."""
  path = source_file(spec, cache_dir)
  if path is None or not os.path.exists(path):
    return spec
  stat = os.stat(path)
  return f'{spec}|{os.path.abspath(path)}|{stat.st_size}|{stat.st_mtime_ns}'


def separator_id(tokenizer) -> int:
  """The id that ends a document in a token stream."""
  special = getattr(tokenizer, 'special_tokens_set', None)
  for name in SEPARATORS:
    if name in END_OF_SEQUENCE and (special is None or name not in special):
      continue  # Text such as HTML's </s>, in a vocabulary that has it as a token.
    try:
      return tokenizer.encode_single_token(name)
    except (KeyError, ValueError):
      continue
  raise DataError(f'tokenizer {tokenizer.name!r} has none of the special tokens '
                  f'{", ".join(SEPARATORS)} to separate documents; declare {END_OF_TEXT} in its '
                  'special tokens')
