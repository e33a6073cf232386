"""tokenizer.json files that tiktoken cannot run, run by Hugging Face's `tokenizers` library.

SentencePiece-style BPE (Metaspace, byte fallback: Llama-2, Mistral, Gemma), Unigram and
WordPiece tokenizers, and byte-level BPE files that data/hf_tokenizer.py cannot convert, are
encoded by the library itself, so their normalisers, pre-tokenisers and added tokens are the
original's. `LibraryTokenizer` gives them the interface the rest of lmlab uses (tiktoken's
names): encode_ordinary and encode_ordinary_batch (special tokens' text is ordinary text),
encode with allowed_special, decode, encode_single_token, n_vocab, special_tokens_set.
"""
import json
import os

from lmlab.data.bpe import encode_around
from lmlab.data.errors import DataError


class LibraryTokenizer:
  """A tokenizer.json loaded by the `tokenizers` library. Ids are the library's with
  add_special_tokens=False: no BOS or EOS is added to encoded text."""

  def __init__(self, path: str, name: str | None = None, *, contents: str | None = None):
    """The tokenizer of the file `path`, or of `contents` (that file's text as changed)."""
    try:
      import tokenizers
    except ImportError:
      raise DataError(f'{path} needs the tokenizers package (pip install tokenizers)') from None
    try:
      if contents is None:
        with open(path, encoding='utf-8') as f:
          contents = f.read()
      # One copy splits off special tokens, the other reads their text as ordinary text.
      self._ordinary, self._special = (tokenizers.Tokenizer.from_str(contents)
                                       for _ in range(2))
    except OSError as error:
      raise DataError(f'{path} cannot be read ({error.strerror})') from None
    except Exception as error:  # The library raises plain Exceptions with its parser's message.
      raise DataError(f'{path} is not a tokenizer.json the tokenizers library reads '
                      f'({str(error).splitlines()[0][:200]})') from None
    self._ordinary.encode_special_tokens = True
    for tokenizer in (self._ordinary, self._special):
      tokenizer.no_padding()
      tokenizer.no_truncation()
    self.path = path
    self.name = name or os.path.basename(os.path.dirname(os.path.abspath(path)))
    added = self._special.get_added_tokens_decoder()
    self.special_ids = {token.content: token_id for token_id, token in added.items()
                        if token.special}
    self.max_token_value = max(self._special.get_vocab(with_added_tokens=True).values())

  @property
  def n_vocab(self) -> int:
    return self.max_token_value + 1

  @property
  def special_tokens_set(self) -> set[str]:
    return set(self.special_ids)

  def with_special_tokens(self, special_tokens: dict[str, int]) -> 'LibraryTokenizer':
    """This tokenizer with the added special tokens {text: id} (chat templates' tokens)."""
    config = json.loads(self._special.to_str())
    config['added_tokens'] = config.get('added_tokens') or []
    config['added_tokens'] += [
        {'id': token_id, 'content': token, 'single_word': False, 'lstrip': False,
         'rstrip': False, 'normalized': False, 'special': True}
        for token, token_id in special_tokens.items() if token not in self.special_ids]
    return LibraryTokenizer(self.path, self.name, contents=json.dumps(config))

  def encode_ordinary(self, text: str) -> list[int]:
    return self._ordinary.encode(text, add_special_tokens=False).ids

  def encode_ordinary_batch(self, texts: list[str], *, num_threads: int = 0) -> list[list[int]]:
    """The library encodes a batch on every core (num_threads: tiktoken's, unused here)."""
    del num_threads
    return [e.ids for e in self._ordinary.encode_batch(texts, add_special_tokens=False)]

  def encode(self, text: str, *, allowed_special=frozenset(),
             disallowed_special='all') -> list[int]:
    """tiktoken's encode: the allowed special tokens are tokens, the others found in the text
    a ValueError unless disallowed_special leaves them out (then they are text)."""
    allowed = self.special_tokens_set if allowed_special == 'all' else set(allowed_special)
    disallowed = (self.special_tokens_set - allowed if disallowed_special == 'all'
                  else set(disallowed_special))
    present = {token for token in self.special_ids if token in text}
    if present & disallowed:
      raise ValueError(f'the text holds the special token {sorted(present & disallowed)[0]!r}, '
                       'which is not allowed')
    if not present & allowed:
      return self.encode_ordinary(text)
    if present <= allowed:
      return self._special.encode(text, add_special_tokens=False).ids
    # Some special tokens here are text and others tokens.
    return encode_around(text, allowed, self.special_ids, self.encode_ordinary)

  def encode_single_token(self, token: str) -> int:
    token_id = self._special.token_to_id(token)
    if token_id is None:
      raise KeyError(token)
    return token_id

  def decode(self, ids, errors: str = 'replace') -> str:
    """The library's decoding; bytes that are no whole UTF-8 character become U+FFFD
    whatever `errors` says."""
    del errors
    return self._special.decode(list(ids), skip_special_tokens=False)

  def decode_bytes(self, ids) -> bytes:
    return self.decode(ids).encode('utf-8')

  def decode_single_token_bytes(self, token: int) -> bytes:
    """The token's vocabulary entry (its spelling, such as '▁the' or '<0x0A>', which is
    what tells two vocabularies apart)."""
    spelled = self._special.id_to_token(token)
    if spelled is None:
      raise KeyError(token)
    return spelled.encode('utf-8')
