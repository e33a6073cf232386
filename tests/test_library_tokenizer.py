"""tokenizer.json files beyond byte-level BPE (SentencePiece-style BPE with byte fallback,
Unigram, WordPiece), built here with the `tokenizers` library: the ids of lmlab's tokenizer
against transformers' AutoTokenizer on the same folder."""
import json

import pytest

from conftest import random_code_points
from lmlab.data import chat
from lmlab.data.errors import DataError
from lmlab.data.hf_library_tokenizer import LibraryTokenizer
from lmlab.data.tokenizer import load_tokenizer, separator_id

tokenizers = pytest.importorskip('tokenizers')
transformers = pytest.importorskip('transformers')
from tokenizers import decoders, models, normalizers, pre_tokenizers, trainers  # noqa: E402

WORDS = ['the', 'cat', 'sat', 'on', 'mat', 'naïve', 'café', 'Über', '中文', '字节', '日本語',
         '🙂', '👩‍💻', 'def', 'f(x):', 'return', 'x**2', '{}', '2024', '42', 'ﬁ', 'Ａ']
SPACES = [' ', '  ', '\t', '\n', ' \n\n ', '   ']
SPECIALS = ['<unk>', '<s>', '</s>']


def random_text(rng, n_words=30):
  """Words trained on and not, runs of whitespace, and arbitrary code points."""
  pieces = []
  for _ in range(n_words):
    pieces += [str(rng.choice(WORDS)), str(rng.choice(SPACES))]
  return ''.join(pieces) + random_code_points(rng, 20) + str(rng.choice(SPACES))


def training_texts(rng):
  return [' '.join(rng.choice(WORDS[:12], 10)) for _ in range(60)]


def sentencepiece_bpe(rng, legacy):
  """Llama-2's layout (legacy: a Prepend/Replace normaliser) or Mistral's and newer Llama's
  (a Metaspace pre-tokeniser), with byte fallback: <0xNN> tokens in the vocabulary."""
  tokenizer = tokenizers.Tokenizer(models.BPE(unk_token='<unk>', fuse_unk=True,
                                              byte_fallback=True))
  if legacy:
    tokenizer.normalizer = normalizers.Sequence([normalizers.Prepend('▁'),
                                                 normalizers.Replace(' ', '▁')])
  else:
    tokenizer.pre_tokenizer = pre_tokenizers.Metaspace(replacement='▁',
                                                       prepend_scheme='first', split=False)
  tokenizer.decoder = decoders.Sequence([decoders.Replace('▁', ' '), decoders.ByteFallback(),
                                         decoders.Fuse(), decoders.Strip(' ', 1, 0)])
  trainer = trainers.BpeTrainer(
      vocab_size=400, show_progress=False,
      special_tokens=SPECIALS + [f'<0x{b:02X}>' for b in range(256)])
  tokenizer.train_from_iterator(training_texts(rng), trainer)
  config = json.loads(tokenizer.to_str())
  # The byte tokens are vocabulary entries, not added tokens, as in Llama-2's file.
  config['added_tokens'] = [t for t in config['added_tokens'] if t['content'] in SPECIALS]
  return config


def unigram(rng):
  """T5/ALBERT's layout: NFKC, a Metaspace pre-tokeniser, Unigram pieces."""
  tokenizer = tokenizers.Tokenizer(models.Unigram())
  tokenizer.normalizer = normalizers.NFKC()
  tokenizer.pre_tokenizer = pre_tokenizers.Metaspace()
  tokenizer.decoder = decoders.Metaspace()
  trainer = trainers.UnigramTrainer(vocab_size=150, special_tokens=SPECIALS, unk_token='<unk>',
                                    show_progress=False)
  tokenizer.train_from_iterator(training_texts(rng), trainer)
  return json.loads(tokenizer.to_str())


def wordpiece(rng):
  """BERT's layout in a tokenizer.json: its normaliser (lower case, accents stripped) and
  pre-tokeniser, ## continuations."""
  tokenizer = tokenizers.Tokenizer(models.WordPiece(unk_token='[UNK]'))
  tokenizer.normalizer = normalizers.BertNormalizer(lowercase=True)
  tokenizer.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
  tokenizer.decoder = decoders.WordPiece()
  trainer = trainers.WordPieceTrainer(vocab_size=200, show_progress=False,
                                      special_tokens=['[PAD]', '[UNK]', '[CLS]', '[SEP]',
                                                      '[MASK]'])
  tokenizer.train_from_iterator(training_texts(rng), trainer)
  return json.loads(tokenizer.to_str())


KINDS = {'sentencepiece-bpe-legacy': lambda rng: sentencepiece_bpe(rng, legacy=True),
         'sentencepiece-bpe-metaspace': lambda rng: sentencepiece_bpe(rng, legacy=False),
         'unigram': unigram, 'wordpiece': wordpiece}


def written(folder, config):
  folder.mkdir()
  (folder / 'tokenizer.json').write_text(json.dumps(config), encoding='utf-8')
  (folder / 'tokenizer_config.json').write_text(json.dumps(
      {'tokenizer_class': 'PreTrainedTokenizerFast'}))
  return folder


@pytest.mark.parametrize('kind', KINDS)
def test_ids_are_transformers_ids(kind, rng, tmp_path):
  folder = written(tmp_path / kind, KINDS[kind](rng))
  ours = load_tokenizer(str(folder / 'tokenizer.json'))
  assert isinstance(ours, LibraryTokenizer)
  reference = transformers.AutoTokenizer.from_pretrained(str(folder))
  assert ours.n_vocab == len(reference)
  texts = [random_text(rng) for _ in range(6)]
  expected = [reference.encode(text, add_special_tokens=False) for text in texts]
  assert [ours.encode_ordinary(text) for text in texts] == expected
  assert ours.encode_ordinary_batch(texts) == expected
  for ids in expected:
    assert ours.decode(ids) == reference.decode(ids, clean_up_tokenization_spaces=False)
  # Special tokens: tokens where allowed, else text, as tiktoken's encode has it.
  special = sorted(ours.special_tokens_set)[-1]
  text = texts[0] + special + texts[1]
  assert ours.encode(text, allowed_special='all') == reference.encode(
      text, add_special_tokens=False)
  as_text = reference.encode(text, add_special_tokens=False, split_special_tokens=True)
  assert ours.encode(text, disallowed_special=()) == ours.encode_ordinary(text) == as_text
  with pytest.raises(ValueError, match='special token'):
    ours.encode(text)
  assert ours.encode_single_token(special) == reference.convert_tokens_to_ids(special)
  # Documents are separated by the end of sequence (BERT's [SEP]).
  end = '[SEP]' if kind == 'wordpiece' else '</s>'
  assert separator_id(ours) == reference.convert_tokens_to_ids(end)


def test_byte_fallback_spells_unseen_characters_in_bytes(rng, tmp_path):
  config = sentencepiece_bpe(rng, legacy=False)
  folder = written(tmp_path / 'spm', config)
  ours = load_tokenizer(str(folder / 'tokenizer.json'))
  unseen = random_code_points(rng, 5)
  vocab = config['model']['vocab']
  assert ours.encode_ordinary(unseen) == [vocab['▁'], *(vocab[f'<0x{b:02X}>']
                                                        for b in unseen.encode())]
  assert ours.decode(ours.encode_ordinary(unseen)) == unseen


def test_chat_tokens_join_as_transformers_adds_them(rng, tmp_path):
  folder = written(tmp_path / 'spm', sentencepiece_bpe(rng, legacy=False))
  ours = load_tokenizer(str(folder / 'tokenizer.json'))
  extended, added = chat.with_special_tokens(ours, ['<|im_start|>', '</s>', '<|im_end|>'])
  assert added == ['<|im_start|>', '<|im_end|>']
  reference = transformers.AutoTokenizer.from_pretrained(str(folder))
  reference.add_special_tokens({'additional_special_tokens': added})
  assert [extended.encode_single_token(t) for t in added] == reference.convert_tokens_to_ids(
      added)
  text = f'<|im_start|>user\n{random_text(rng)}<|im_end|>\n<|im_start|>assistant\n'
  assert extended.encode(text, allowed_special=set(added), disallowed_special=()) == (
      reference.encode(text, add_special_tokens=False))


def test_a_file_the_library_cannot_read_is_one_error_naming_it(tmp_path):
  path = tmp_path / 'tokenizer.json'
  path.write_text(json.dumps({'model': {'type': 'Unigram', 'vocab': 'oops'}}))
  with pytest.raises(DataError, match=f'{path} is not a tokenizer.json the tokenizers'):
    load_tokenizer(str(path))
