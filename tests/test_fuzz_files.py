"""Corrupt files of every kind the readers take, generated with hypothesis: truncations, bit
flips, overwritten or inserted bytes (not UTF-8 among them), empty files, and JSON whose
values have the wrong type, huge numbers or are missing.

Each read must end in our error type, or, where the corruption leaves a valid file, in a
result that agrees with an independent decoding (the safetensors package, transformers,
tiktoken's own loader); never in another exception, a hang, or allocations beyond a few MB.
"""
import base64
import dataclasses
import functools
import io
import json
import os
import signal
import struct
import tempfile
import tracemalloc

import ml_dtypes
import numpy as np
import pytest
from hypothesis import HealthCheck, event, given, settings, strategies as st

from conftest import random_code_points
from lmlab.data import bpe, token_cache, wordpiece
from lmlab.data.corpus import Document
from lmlab.data.errors import DataError
from lmlab.data.hf_tokenizer import encoding_from_tokenizer_json
from lmlab.data.seq2seq import read_pairs_tsv
from lmlab.data.tokenizer import byte_tokenizer
from lmlab.experiments import grid
from lmlab.models import hf
from lmlab.models.config import ModelConfig
from lmlab.models.errors import CheckpointError, ConfigError
from lmlab.models.hf import safetensors_files
from lmlab.training import workdir
from lmlab.training.objectives import read_labelled

torch = pytest.importorskip('torch')
transformers = pytest.importorskip('transformers')
safetensors_torch = pytest.importorskip('safetensors.torch')
tiktoken_load = pytest.importorskip('tiktoken.load')

FUZZ = settings(max_examples=60, deadline=None, derandomize=False,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
PEAK_BYTES = 16 << 20  # Python allocations while reading files of a few kB.
SECONDS = 30
# Bytes that never occur in UTF-8, or start a sequence that the next byte does not continue.
NOT_UTF8 = [b'\xff', b'\xc3', b'\x80', b'\xed\xa0\x80', b'\xf8\x88\x80\x80\x80']
ODD_VALUES = ['32', '', 'x' * 200, 10**30, 2**63, 2**24 + 1, -1, 0, 1.5, 1e308, float('nan'),
              True, False, None, [], {}, [1, 'a'], {'a': {'b': []}}]


def bounded(read):
  """read(), failing the test if it runs past SECONDS or its Python allocations peak above
  PEAK_BYTES (numpy's included; a memory map is not an allocation)."""

  def timeout(signum, frame):
    raise AssertionError(f'the read ran past {SECONDS} s')

  previous = signal.signal(signal.SIGALRM, timeout)
  signal.setitimer(signal.ITIMER_REAL, SECONDS)
  tracemalloc.start()
  try:
    return read()
  finally:
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    signal.setitimer(signal.ITIMER_REAL, 0)
    signal.signal(signal.SIGALRM, previous)
    assert peak < PEAK_BYTES, f'the read allocated {peak} bytes'


def outcome(read, errors):
  """(result, None) or (None, our error's message); any other exception fails the test."""
  try:
    result = bounded(read), None
  except errors as error:
    event('refused')  # In --hypothesis-show-statistics, with the share of reads.
    return None, str(error)
  event('read')
  return result


@st.composite
def corrupted(draw, data: bytes, start: int = 0) -> bytes:
  """data with bytes from `start` on cut, flipped, overwritten or inserted, or replaced."""
  kind = draw(st.sampled_from(['truncate', 'flip', 'overwrite', 'insert', 'empty', 'garbage']))
  if kind == 'empty' or len(data) <= start:
    return data[:start]
  if kind == 'garbage':
    return data[:start] + draw(st.binary(max_size=64))
  # sampled_from spreads positions over the file; integers() favours its start.
  positions = st.sampled_from(range(start, len(data)))
  at = draw(positions)
  if kind == 'truncate':
    return data[:at]
  if kind == 'flip':
    flipped = bytearray(data)
    for position in draw(st.lists(positions, min_size=1, max_size=3)):
      flipped[position] ^= 1 << draw(st.integers(0, 7))
    return bytes(flipped)
  patch = draw(st.binary(min_size=1, max_size=8) | st.sampled_from(NOT_UTF8))
  if kind == 'overwrite':
    return data[:at] + patch + data[at + len(patch):]
  return data[:at] + patch + data[at:]


def json_paths(value, path=()):
  yield path
  children = value.items() if isinstance(value, dict) else (
      enumerate(value) if isinstance(value, list) else ())
  for key, child in children:
    yield from json_paths(child, path + (key,))


@st.composite
def mutated_json(draw, document) -> bytes:
  """`document` with one value replaced by one of another kind, or one key removed."""
  path = draw(st.sampled_from(list(json_paths(document))))
  replacement = draw(st.sampled_from(ODD_VALUES) | st.integers() | st.text(max_size=4))
  if not path:
    return json.dumps(replacement).encode()
  document = json.loads(json.dumps(document))
  parent = functools.reduce(lambda value, key: value[key], path[:-1], document)
  if isinstance(parent, dict) and draw(st.booleans()):
    del parent[path[-1]]
  else:
    parent[path[-1]] = replacement
  return json.dumps(document).encode()


def corrupted_json(document):
  return st.one_of(mutated_json(document), corrupted(json.dumps(document, indent=1).encode()))


def written(folder: str, name: str, data: bytes) -> str:
  path = os.path.join(folder, name)
  with open(path, 'wb') as f:
    f.write(data)
  return path


def json_or_none(data: bytes):
  try:
    return json.loads(data)
  except ValueError:
    return None


# ---- safetensors -----------------------------------------------------------------------

TORCH_DTYPES = {'F64': torch.float64, 'F32': torch.float32, 'F16': torch.float16,
                'BF16': torch.bfloat16, 'I64': torch.int64, 'I32': torch.int32,
                'I16': torch.int16, 'I8': torch.int8, 'U8': torch.uint8, 'BOOL': torch.bool}
NUMPY_DTYPES = {torch.bfloat16: np.dtype(ml_dtypes.bfloat16), torch.bool: np.dtype(np.bool_)}


@st.composite
def tensor_sets(draw) -> dict:
  """A few named tensors of any dtype, scalars and empty ones among them."""
  names = draw(st.lists(st.text('abc.0123', min_size=1, max_size=6), min_size=1, max_size=4,
                        unique=True))
  rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
  tensors = {}
  for name in names:
    shape = draw(st.lists(st.integers(0, 8), max_size=3))
    values = torch.from_numpy(np.asarray(rng.uniform(0, 100, shape)))
    tensors[name] = values.to(TORCH_DTYPES[draw(st.sampled_from(sorted(TORCH_DTYPES)))])
  return tensors


def as_numpy(tensor):
  """The library's tensor as numpy, bfloat16 as ml_dtypes' (numpy has none)."""
  if tensor.dtype == torch.bfloat16:
    return tensor.view(torch.int16).numpy().view(ml_dtypes.bfloat16)
  return tensor.numpy()


def read_checkpoint(folder: str) -> dict:
  checkpoint = safetensors_files.Checkpoint(folder)
  return {name: np.array(checkpoint.read(name)) for name in checkpoint.names()}


def library_read(paths) -> dict | None:
  """The tensors of the files as the safetensors package reads them, or None if it refuses."""
  tensors = {}
  for path in paths:
    try:
      tensors.update(safetensors_torch.load_file(path))
    except Exception:  # noqa: BLE001 (whatever the library raises means "refused")
      return None
  return tensors


def assert_same_tensors(ours: dict, library: dict):
  assert set(ours) == set(library)
  for name, tensor in library.items():
    expected = as_numpy(tensor)
    assert ours[name].dtype == expected.dtype and ours[name].shape == expected.shape, name
    assert ours[name].tobytes() == expected.tobytes(), name


@FUZZ
@given(tensors=tensor_sets(), data=st.data())
def test_corrupt_safetensors_file_is_refused_or_read_as_the_library_reads_it(tensors, data):
  original = safetensors_torch.save(tensors)
  tensors_start = 8 + struct.unpack('<Q', original[:8])[0]
  start = data.draw(st.sampled_from([0, tensors_start]), label='corrupted from byte')
  with tempfile.TemporaryDirectory() as folder:
    path = written(folder, 'model.safetensors', data.draw(corrupted(original, start)))
    ours, error = outcome(lambda: read_checkpoint(folder), CheckpointError)
    library = library_read([path])
    if error is not None:
      assert path in error
      assert library is None, f'the library reads what we refuse: {error}'
    else:
      assert library is not None, 'we read what the library refuses'
      assert_same_tensors(ours, library)


@pytest.mark.parametrize('length', [2**64 - 1, 2**63, 10**12, 100_000_001, 'file size - 7'])
def test_header_lengths_past_the_cap_or_the_file_are_refused_before_reading(tmp_path, length):
  header = json.dumps({'x': {'dtype': 'F32', 'shape': [1], 'data_offsets': [0, 4]}}).encode()
  size = 8 + len(header) + 4
  length = size - 7 if length == 'file size - 7' else length
  path = written(str(tmp_path), 'model.safetensors',
                 struct.pack('<Q', length) + header + b'\0' * 4)
  with pytest.raises(CheckpointError, match=f'says {length} bytes') as raised:
    bounded(lambda: read_checkpoint(str(tmp_path)))
  assert path in str(raised.value)


@FUZZ
@given(tensors=tensor_sets(), data=st.data())
def test_corrupt_shard_index_is_refused_or_read_as_it_lists(tensors, data):
  names = sorted(tensors)
  shards = {'model-1.safetensors': names[::2], 'model-2.safetensors': names[1::2]}
  index = {'metadata': {'total_size': 0},
           'weight_map': {name: shard for shard, members in shards.items() for name in members}}
  with tempfile.TemporaryDirectory() as folder:
    for shard, members in shards.items():
      safetensors_torch.save_file({name: tensors[name] for name in members},
                                  os.path.join(folder, shard))
    corrupt = data.draw(corrupted_json(index))
    path = written(folder, safetensors_files.INDEX_FILE, corrupt)
    ours, error = outcome(lambda: read_checkpoint(folder), CheckpointError)
    if error is not None:
      assert folder in error
      return
    listed = set(json.loads(corrupt)['weight_map'].values())
    assert listed <= set(shards), f'{path} reached outside the folder'
    assert_same_tensors(ours, library_read([os.path.join(folder, name) for name in listed]))


# ---- config.json of Hugging Face checkpoints, and ours ---------------------------------

@functools.cache
def hf_configs() -> list:
  """config.json of each supported family, as transformers writes it."""
  small = dict(vocab_size=97, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
               intermediate_size=48, max_position_embeddings=64)
  yarn = {'rope_type': 'yarn', 'factor': 4.0, 'original_max_position_embeddings': 16}
  configs = [
      ('Llama', dict(small, num_key_value_heads=2, rope_scaling=yarn)),
      ('Qwen2', dict(small, num_key_value_heads=2,
                     dual_chunk_attention_config={'chunk_size': 16, 'local_size': 4})),
      ('Bloom', dict(vocab_size=97, hidden_size=32, n_layer=2, n_head=4)),
      ('Bert', dict(small)),
      ('DeepseekV2', dict(small, kv_lora_rank=16, q_lora_rank=None, qk_rope_head_dim=8,
                          qk_nope_head_dim=12, v_head_dim=10, first_k_dense_replace=2)),
  ]
  documents = []
  for family, fields in configs:
    document = json.loads(getattr(transformers, f'{family}Config')(**fields).to_json_string())
    architecture = 'BertForMaskedLM' if family == 'Bert' else f'{family}ForCausalLM'
    documents.append({**document, 'architectures': [architecture]})
  return documents


@FUZZ
@given(data=st.data())
def test_corrupt_hf_config_is_refused_naming_the_problem_or_read_as_written(data):
  document = data.draw(st.sampled_from(hf_configs()))
  corrupt = data.draw(corrupted_json(document))
  with tempfile.TemporaryDirectory() as folder:
    written(folder, hf.CONFIG_FILE, corrupt)
    result, error = outcome(lambda: hf.read_config(folder), (CheckpointError, ConfigError))
    eos, eos_error = outcome(lambda: hf.end_token_id(folder), CheckpointError)
  if error is not None:
    return
  config, written_config = result[1], json.loads(corrupt)
  layers = written_config.get('n_layer') or written_config.get('num_hidden_layers')
  assert (config.vocab_size, config.d_model, config.n_layers) == (
      written_config['vocab_size'], written_config['hidden_size'], layers)
  listed = written_config.get('eos_token_id')
  assert eos_error is not None or eos == (listed[0] if isinstance(listed, list) else listed)


def test_wrong_types_in_hf_config_are_named(tmp_path):
  document = hf_configs()[0]
  for name, value in [('hidden_size', '32'), ('rms_norm_eps', 'small'),
                      ('tie_word_embeddings', 'yes'), ('num_hidden_layers', 10**30)]:
    written(str(tmp_path), hf.CONFIG_FILE, json.dumps({**document, name: value}).encode())
    with pytest.raises(CheckpointError, match=f'config.json {name}='):
      hf.read_config(str(tmp_path))
  scaling = dict(document['rope_parameters'], factor='4')
  written(str(tmp_path), hf.CONFIG_FILE,
          json.dumps({**document, 'rope_parameters': scaling}).encode())
  with pytest.raises(ConfigError, match='factor'):
    hf.read_config(str(tmp_path))


@FUZZ
@given(data=st.data())
def test_corrupt_run_config_is_refused_or_read_as_written(data):
  model = ModelConfig(vocab_size=320, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2,
                      ffn_dim=64, max_seq_len=64)
  document = {'model': dataclasses.asdict(model), 'tokenizer': 'bytes', 'steps': 10}
  corrupt = data.draw(corrupted_json(document))
  with tempfile.TemporaryDirectory() as folder:
    written(folder, workdir.CONFIG_FILE, corrupt)
    result, error = outcome(lambda: workdir.read_config(folder), workdir.WorkdirError)
  if error is None:
    # A field the file lacks (it predates the field) takes its default.
    expected = {**dataclasses.asdict(ModelConfig()), **json.loads(corrupt)['model']}
    if isinstance(expected.get('remat'), bool):  # The form before remat named a policy.
      expected['remat'] = 'full' if expected['remat'] else 'none'
    assert dataclasses.asdict(result['model']) == expected


# ---- tokenizer files ---------------------------------------------------------------------

def random_text(rng) -> str:
  return rng.choice(['the cat', "it's 42 ", '中文 🙂', ' \t\n']) * 3 + random_code_points(rng, 40)


@st.composite
def tiktoken_files(draw):
  """(ranks file, sidecar JSON): the single bytes and some merges in rank order."""
  rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
  tokens = [bytes([b]) for b in range(256)]
  while len(tokens) < 256 + draw(st.integers(0, 40)):
    merged = tokens[rng.integers(len(tokens))] + tokens[rng.integers(len(tokens))]
    tokens += [merged] if merged not in tokens else []
  lines = b''.join(base64.b64encode(token) + b' %d\n' % rank for rank, token in enumerate(tokens))
  sidecar = {'pattern': bpe.PATTERNS[draw(st.sampled_from(sorted(bpe.PATTERNS)))],
             'special_tokens': {'<|endoftext|>': len(tokens)}}
  return lines, sidecar


def oracle_ranks(path: str, contents: bytes):
  """tiktoken's own reading of a ranks file; it fails on whitespace-only lines, which we skip."""
  try:
    return tiktoken_load.load_tiktoken_bpe(path)
  except ValueError:
    assert any(line and not line.strip() for line in contents.splitlines())
    return None


@FUZZ
@given(files=tiktoken_files(), which=st.sampled_from(['ranks', 'sidecar']), data=st.data())
def test_corrupt_tiktoken_files_are_refused_or_encode_as_their_ranks_say(files, which, data):
  lines, sidecar = files
  if which == 'ranks':
    lines = data.draw(corrupted(lines))
    sidecar_bytes = json.dumps(sidecar).encode()
  else:
    sidecar_bytes = data.draw(corrupted_json(sidecar))
  rng = np.random.default_rng(data.draw(st.integers(0, 2**32 - 1)))
  with tempfile.TemporaryDirectory() as folder:
    path = written(folder, 'mine.tiktoken', lines)
    written(folder, 'mine.tiktoken.json', sidecar_bytes)
    encoding, error = outcome(lambda: bpe.load_tiktoken(path), DataError)
    if error is not None:
      assert path in error
      return
    ranks = oracle_ranks(path, lines)
  settings_read = json.loads(sidecar_bytes)
  assert encoding._special_tokens == settings_read['special_tokens']
  if ranks is not None:
    assert encoding._mergeable_ranks == ranks
    text = random_text(rng)
    assert encoding.encode_ordinary(text) == bpe.reference_encode(ranks, text,
                                                                  settings_read['pattern'])


@functools.cache
def gpt2_characters() -> dict:
  """Each character of GPT-2's byte alphabet -> its byte, as transformers has it."""
  from transformers.convert_slow_tokenizer import bytes_to_unicode
  return {character: byte for byte, character in bytes_to_unicode().items()}


@functools.cache
def tokenizer_json() -> dict:
  tokenizers = pytest.importorskip('tokenizers')
  tokenizer = tokenizers.Tokenizer(tokenizers.models.BPE())
  tokenizer.pre_tokenizer = tokenizers.pre_tokenizers.ByteLevel(add_prefix_space=False)
  trainer = tokenizers.trainers.BpeTrainer(
      vocab_size=300, special_tokens=['<|endoftext|>'], show_progress=False,
      initial_alphabet=tokenizers.pre_tokenizers.ByteLevel.alphabet())
  tokenizer.train_from_iterator(['the cat sat on the mat', "it's 42 中文"] * 5, trainer)
  return json.loads(tokenizer.to_str())


@FUZZ
@given(data=st.data())
def test_corrupt_tokenizer_json_is_refused_or_encodes_as_written(data):
  corrupt = data.draw(corrupted_json(tokenizer_json()))
  rng = np.random.default_rng(data.draw(st.integers(0, 2**32 - 1)))
  with tempfile.TemporaryDirectory() as folder:
    path = written(folder, 'tokenizer.json', corrupt)
    encoding, error = outcome(lambda: encoding_from_tokenizer_json(path), DataError)
  if error is not None:
    assert path in error
    return
  document = json.loads(corrupt)
  added = {token['content']: token['id'] for token in document.get('added_tokens') or []}
  ranks = {bytes(gpt2_characters()[c] for c in token): token_id
           for token, token_id in document['model']['vocab'].items()
           if token_id not in added.values()}
  # A vocabulary without some single bytes keeps its own ranks beside stand-ins for those.
  assert (encoding._special_tokens, getattr(encoding, 'ordinary_ranks',
                                            encoding._mergeable_ranks)) == (added, ranks)
  text = random_text(rng)
  if all(bytes([b]) in ranks for b in range(256)):
    expected = bpe.reference_encode(ranks, text, bpe.PATTERNS['gpt2'])
  else:  # The `tokenizers` library leaves such bytes out (the reference encoder cannot).
    import tokenizers
    expected = tokenizers.Tokenizer.from_str(corrupt.decode('utf-8')).encode(
        text, add_special_tokens=False).ids
  assert encoding.encode_ordinary(text) == expected


@FUZZ
@given(pieces=st.lists(st.text(st.characters(blacklist_categories=['Cs', 'Zs', 'Cc', 'Zl',
                                                                    'Zp']),
                                min_size=1, max_size=4), max_size=20, unique=True),
       data=st.data())
def test_corrupt_vocab_txt_is_refused_or_read_as_transformers_reads_it(pieces, data):
  from transformers.models.bert.tokenization_bert import load_vocab
  contents = ''.join(piece + '\n' for piece in ['[UNK]', *pieces]).encode('utf-8')
  with tempfile.TemporaryDirectory() as folder:
    path = written(folder, 'vocab.txt', data.draw(corrupted(contents)))
    tokenizer, error = outcome(lambda: wordpiece.WordPieceTokenizer(path), DataError)
    if error is not None:
      assert path in error
      return
    assert tokenizer.pieces == list(load_vocab(path))


# ---- data files --------------------------------------------------------------------------

@FUZZ
@given(rows=st.lists(st.tuples(st.text('ab c', min_size=1), st.text('ab c')), min_size=1,
                     max_size=6),
       reader=st.sampled_from(['pairs', 'labelled']), data=st.data())
def test_corrupt_tsv_files_are_refused_or_read_line_by_line(rows, reader, data):
  contents = ''.join(f'{first}\t{second}\n' for first, second in rows).encode('utf-8')
  corrupt = data.draw(corrupted(contents))
  read = {'pairs': lambda path: read_pairs_tsv(path, lambda text: list(text.encode())),
          'labelled': read_labelled}[reader]
  with tempfile.TemporaryDirectory() as folder:
    path = written(folder, 'rows.tsv', corrupt)
    result, error = outcome(lambda: read(path), DataError)
  if error is not None:
    assert path in error
    return
  # Python's own reading of text files: UTF-8, universal newlines.
  with io.TextIOWrapper(io.BytesIO(corrupt), encoding='utf-8') as f:
    lines = [line.rstrip('\n') for line in f]
  lines = [line for line in lines if (line if reader == 'pairs' else line.strip())]
  if reader == 'pairs':
    result = [(bytes(source.tolist()).decode(), bytes(target.tolist()).decode())
              for source, target in result]
  assert result == [tuple(line.split('\t', 1)) for line in lines]


@FUZZ
@given(which=st.sampled_from(['meta', 'train', 'val']), data=st.data())
def test_corrupt_token_cache_is_refused_or_read_as_its_meta_says(which, data):
  tokenizer = byte_tokenizer()
  with tempfile.TemporaryDirectory() as folder:
    splits = {}
    for name in ('train', 'val'):
      text = data.draw(st.text('abc 中', max_size=20), label=name)
      splits[name] = [Document(written(folder, f'{name}.txt', text.encode('utf-8')), name)]
    cache = os.path.join(folder, 'tokens')
    load = functools.partial(token_cache.load_splits, splits, tokenizer, cache,
                             tokenizer_id='bytes', log=lambda message: None)
    expected = {name: np.array(tokens) for name, tokens in load().items()}
    (key,) = os.listdir(cache)
    path = os.path.join(cache, key, 'meta.json' if which == 'meta' else f'{which}.bin')
    with open(path, 'rb') as f:
      original = f.read()
    corrupt = data.draw(corrupted_json(json.loads(original)) if which == 'meta'
                        else corrupted(original))
    written(os.path.dirname(path), os.path.basename(path), corrupt)
    tokens, error = outcome(load, DataError)
    if error is not None:
      assert os.path.join(cache, key) in error
      return
    with open(os.path.join(cache, key, 'meta.json')) as f:
      listed = json.load(f)['splits']
    assert set(tokens) == set(splits)
    for name, values in tokens.items():
      assert len(values) == listed[name]['tokens']
      if which == name:
        assert values.tobytes() == corrupt
      else:
        np.testing.assert_array_equal(values, expected[name])


@FUZZ
@given(data=st.data())
def test_metrics_lines_that_a_killed_run_cut_short_are_skipped(data):
  lines = [{'step': 0, 'eval_loss': 5.0}, {'step': 1, 'loss': 4.0, 'tokens_per_sec': 100.0},
           {'step': 2, 'loss': 3.5, 'tokens_per_sec': 120.0}, {'step': 2, 'eval_loss': 3.9}]
  encoded = [json.dumps(line).encode() for line in lines]
  corrupt = data.draw(corrupted(b''.join(line + b'\n' for line in encoded)))
  with tempfile.TemporaryDirectory() as folder:
    written(folder, 'metrics.jsonl', corrupt)
    read, _ = outcome(lambda: grid._metrics_lines(folder), ())
  corrupt_lines = corrupt.split(b'\n')
  assert all(line in read for line, raw in zip(lines, encoded) if raw in corrupt_lines)
  parsed = [json_or_none(line.decode('utf-8', 'replace')) for line in corrupt_lines]
  assert all(entry in parsed for entry in read)
