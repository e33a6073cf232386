"""Hugging Face byte-level BPE tokenizer.json -> tiktoken, against the `tokenizers` library and
transformers."""
import json

import pytest

from conftest import random_code_points
from lmlab.data.errors import DataError
from lmlab.data import bpe, chat
from lmlab.data.tokenizer import separator_id
from lmlab.data.hf_tokenizer import encoding_from_tokenizer_json, ranks_from_tokenizer_json

tokenizers = pytest.importorskip('tokenizers')

END_OF_TEXT = '<|endoftext|>'
# The Split regexes of LLaMA-3's and Qwen2's tokenizer.json: cl100k's, written without
# possessive quantifiers; Qwen2's makes each digit its own pre-token.
LLAMA3_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}|"
                r" ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
QWEN2_SPLIT = LLAMA3_SPLIT.replace(r'\p{N}{1,3}', r'\p{N}')
WORDS = ['the', 'cat', 'sat', "it's", 'on', 'mat', 'tokenizer', '中文', '字节', '🙂', 'naïve',
         '2024', '42', '(x)', '=>', '\t', '\n', '  ']


def random_sentences(rng, n):
  return [' '.join(rng.choice(WORDS, rng.integers(3, 12))) for _ in range(n)]


def random_text(rng):
  # Trained words, unseen words and arbitrary code points (no surrogates).
  return ' '.join(random_sentences(rng, 5)) + ' zebra 99 ' + random_code_points(rng, 60)


def trained_tokenizer(rng, split_pattern=None):
  tokenizer = tokenizers.Tokenizer(tokenizers.models.BPE())
  byte_level = tokenizers.pre_tokenizers.ByteLevel(add_prefix_space=False,
                                                   use_regex=split_pattern is None)
  if split_pattern is None:
    tokenizer.pre_tokenizer = byte_level
  else:
    split = tokenizers.pre_tokenizers.Split(tokenizers.Regex(split_pattern), behavior='isolated')
    tokenizer.pre_tokenizer = tokenizers.pre_tokenizers.Sequence([split, byte_level])
  tokenizer.decoder = tokenizers.decoders.ByteLevel()
  trainer = tokenizers.trainers.BpeTrainer(
      vocab_size=256 + 1 + int(rng.integers(30, 150)), special_tokens=[END_OF_TEXT],
      initial_alphabet=tokenizers.pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
  tokenizer.train_from_iterator(random_sentences(rng, 40), trainer)
  return tokenizer


@pytest.mark.parametrize('split_pattern', [None, LLAMA3_SPLIT, QWEN2_SPLIT])
def test_converted_tokenizer_gives_the_ids_of_the_tokenizers_library(rng, tmp_path,
                                                                      split_pattern):
  tokenizer = trained_tokenizer(rng, split_pattern)
  path = str(tmp_path / 'tokenizer.json')
  tokenizer.save(path)
  encoding = encoding_from_tokenizer_json(path)
  assert encoding.name == tmp_path.name
  assert encoding.n_vocab == tokenizer.get_vocab_size()
  for _ in range(5):
    text = random_text(rng)
    expected = tokenizer.encode(text, add_special_tokens=False).ids
    assert encoding.encode_ordinary(text) == expected
    assert encoding.decode(expected) == text
  with_special = random_text(rng) + END_OF_TEXT + random_text(rng)
  assert (encoding.encode(with_special, allowed_special='all')
          == tokenizer.encode(with_special, add_special_tokens=False).ids)


def test_merge_strings_and_pairs_convert_alike(rng, tmp_path):
  tokenizer = trained_tokenizer(rng)
  config = json.loads(tokenizer.to_str())
  config['model']['merges'] = [' '.join(pair) for pair in config['model']['merges']]
  path = tmp_path / 'tokenizer.json'
  path.write_text(json.dumps(config), encoding='utf-8')
  ranks, pattern, special_tokens = ranks_from_tokenizer_json(str(path))
  assert pattern == bpe.PATTERNS['gpt2']
  assert special_tokens == {END_OF_TEXT: tokenizer.token_to_id(END_OF_TEXT)}
  assert len(ranks) + 1 == tokenizer.get_vocab_size()


def edited_config(rng, tmp_path, edit):
  config = json.loads(trained_tokenizer(rng).to_str())
  edit(config)
  path = tmp_path / 'tokenizer.json'
  path.write_text(json.dumps(config), encoding='utf-8')
  return str(path)


def set_path(keys, value):
  def edit(config):
    for key in keys[:-1]:
      config = config[key]
    config[keys[-1]] = value
  return edit


@pytest.mark.parametrize('keys, value, error', [
    (['model', 'type'], 'WordPiece', "model type 'WordPiece' is unsupported"),
    (['model', 'byte_fallback'], True, 'byte_fallback'),
    (['normalizer'], {'type': 'Lowercase'}, "normalizer 'Lowercase' is unsupported"),
    (['pre_tokenizer'], {'type': 'Whitespace'}, r"pre_tokenizer steps \['Whitespace'\]"),
    (['pre_tokenizer', 'add_prefix_space'], True, 'add_prefix_space'),
    (['model', 'vocab', 'not\tbyte-level'], 10**6, 'outside the byte-level alphabet'),
])
def test_unsupported_tokenizer_json_is_an_error_naming_what(rng, tmp_path, keys, value, error):
  path = edited_config(rng, tmp_path, set_path(keys, value))
  with pytest.raises(DataError, match=error):
    ranks_from_tokenizer_json(path)


def test_split_regex_that_the_two_regex_engines_read_differently_is_an_error(rng, tmp_path):
  tokenizer = trained_tokenizer(rng, bpe.PATTERNS['cl100k'])
  path = str(tmp_path / 'tokenizer.json')
  tokenizer.save(path)
  with pytest.raises(DataError, match='repetition'):
    ranks_from_tokenizer_json(path)


def test_ids_out_of_merge_order_are_an_error(rng, tmp_path):
  path = edited_config(rng, tmp_path, lambda config: config['model']['merges'].reverse())
  with pytest.raises(DataError, match='not in merge order'):
    ranks_from_tokenizer_json(path)


@pytest.mark.parametrize('unknown', [None, END_OF_TEXT])
def test_vocabulary_without_some_bytes_encodes_as_transformers(rng, tmp_path, unknown):
  """StarCoder-family vocabularies lack the single bytes their training text never had:
  transformers leaves such a byte out, or puts the model's unk_token in its place."""
  tokenizer = trained_tokenizer(rng)
  config = json.loads(tokenizer.to_str())
  seen = set(''.join(WORDS).encode())
  absent = rng.choice([b for b in range(256) if b not in seen], 40, replace=False)
  from transformers.convert_slow_tokenizer import bytes_to_unicode
  stand_in = bytes_to_unicode()
  for b in absent:
    del config['model']['vocab'][stand_in[b]]
  config['model']['unk_token'] = unknown
  folder = tmp_path / 'starcoder-like'
  folder.mkdir()
  (folder / 'tokenizer.json').write_text(json.dumps(config), encoding='utf-8')
  (folder / 'tokenizer_config.json').write_text('{"tokenizer_class": "PreTrainedTokenizerFast"}')
  encoding = encoding_from_tokenizer_json(str(folder / 'tokenizer.json'))
  reference = pytest.importorskip('transformers').AutoTokenizer.from_pretrained(str(folder))
  controls = ''.join(chr(b) for b in absent if b < 0x80)
  for _ in range(5):
    text = ''.join(rng.permutation(list(random_text(rng) + controls * 2)))
    assert encoding.encode_ordinary(text) == reference.encode(text, add_special_tokens=False)
  assert encoding.n_vocab == max(config['model']['vocab'].values()) + 1
  # Chat tokens join it as they join a complete vocabulary.
  extended, added = chat.with_special_tokens(encoding, ['<|im_start|>'])
  assert added == ['<|im_start|>'] and extended.n_vocab == encoding.n_vocab + 1
  plain = reference.encode(text, add_special_tokens=False)
  assert extended.encode(f'{text}<|im_start|>{text}', allowed_special=set(added)) == [
      *plain, extended.encode_single_token('<|im_start|>'), *plain]


def test_absent_bytes_with_fused_unknowns_are_an_error(rng, tmp_path):
  def edit(config):
    del config['model']['vocab']['Ā']
    config['model'].update(unk_token=END_OF_TEXT, fuse_unk=True)
  with pytest.raises(DataError, match='fuse_unk=true is unsupported'):
    encoding_from_tokenizer_json(edited_config(rng, tmp_path, edit))


def test_end_of_sequence_text_is_no_document_separator():
  """</s> separates documents only as a special token, not as (HTML) text in the vocabulary."""
  ranks = {bytes([b]): b for b in range(256)}
  as_text = bpe.build_encoding('html', {**ranks, b'</s>': 256}, pattern=bpe.GPT2_PATTERN,
                               special_tokens={}, source='test')
  with pytest.raises(DataError, match='to separate documents'):
    separator_id(as_text)
  as_special = bpe.build_encoding('eos', ranks, pattern=bpe.GPT2_PATTERN,
                                  special_tokens={'</s>': 256}, source='test')
  assert separator_id(as_special) == 256
