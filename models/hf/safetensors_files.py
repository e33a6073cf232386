"""Reading and writing the safetensors format with numpy alone, bfloat16 included.

A file is an 8-byte little-endian header length, a JSON header mapping each tensor name
to its dtype, shape and byte range, then the raw little-endian data. The safetensors
package's numpy path cannot represent bfloat16, the dtype most checkpoints are stored in,
so tensors are read here as memory-mapped views (ml_dtypes supplies bfloat16): reading a
tensor touches only its own bytes, and a whole checkpoint is never in memory at once.
Every header is checked against the format before anything is allocated or mapped: its
length (at most 100 MB, inside the file), its JSON, and each tensor's dtype, shape and byte
range, the ranges covering the data exactly, without overlaps or holes.
"""
import json
import math
import os
import struct

import ml_dtypes
import numpy as np

from lmlab.models.errors import CheckpointError
from lmlab.models.json_values import read_json

DTYPES = {'F64': np.float64, 'F32': np.float32, 'F16': np.float16, 'BF16': ml_dtypes.bfloat16,
          'I64': np.int64, 'I32': np.int32, 'I16': np.int16, 'I8': np.int8, 'U8': np.uint8,
          'BOOL': np.bool_}
CODES = {np.dtype(dtype): code for code, dtype in DTYPES.items()}
INDEX_FILE = 'model.safetensors.index.json'
SINGLE_FILE = 'model.safetensors'
# The format's cap on the JSON header, which is read whole.
MAX_HEADER_BYTES = 100_000_000


def _shown(value) -> str:
  """A value of an untrusted file for an error message, cut short."""
  text = repr(value)
  return text if len(text) <= 60 else text[:57] + '...'


def _is_count(value) -> bool:
  return type(value) is int and value >= 0


def _check_entry(path: str, name: str, entry, data_size: int):
  """Raises unless `entry` is a tensor's {dtype, shape, data_offsets} inside the data."""
  if not isinstance(entry, dict):
    raise CheckpointError(f'{path}: tensor {name!r} has {_shown(entry)}, not an object with '
                          'dtype, shape and data_offsets')
  dtype, shape, offsets = entry.get('dtype'), entry.get('shape'), entry.get('data_offsets')
  if not isinstance(dtype, str):
    raise CheckpointError(f'{path}: tensor {name!r} has dtype {_shown(dtype)}, not a string')
  if not (isinstance(shape, list) and all(map(_is_count, shape))):
    raise CheckpointError(f'{path}: tensor {name!r} has shape {_shown(shape)}, not a list of '
                          'sizes >= 0')
  if not (isinstance(offsets, list) and len(offsets) == 2 and all(map(_is_count, offsets))
          and offsets[0] <= offsets[1] <= data_size):
    raise CheckpointError(f'{path}: tensor {name!r} has data_offsets {_shown(offsets)}, not '
                          f'[begin, end] with 0 <= begin <= end <= {data_size} (the bytes '
                          'after the header)')
  if dtype in DTYPES:
    expected = np.dtype(DTYPES[dtype]).itemsize * math.prod(shape)
    if offsets[1] - offsets[0] != expected:
      raise CheckpointError(f'{path}: tensor {name!r} spans {offsets[1] - offsets[0]} bytes; '
                            f'shape {shape} of {dtype} needs {expected}')


def _check_layout(path: str, entries: dict, data_size: int):
  """The format's rule: tensors cover the bytes after the header in order, without overlaps
  or holes (so that no other content can hide in a file)."""
  covered = 0
  for name, entry in sorted(entries.items(), key=lambda item: item[1]['data_offsets']):
    begin, end = entry['data_offsets']
    if begin != covered:
      what = 'overlaps the tensor before it' if begin < covered else 'leaves a hole before it'
      raise CheckpointError(f'{path}: tensor {name!r} at bytes {begin}..{end} {what} (which '
                            f'ends at {covered})')
    covered = end
  if covered != data_size:
    raise CheckpointError(f'{path}: the tensors end at byte {covered} of the {data_size} after '
                          'the header; the rest belongs to no tensor')


def _unique_keys(pairs):
  keys = [key for key, _ in pairs]
  if len(set(keys)) != len(keys):
    raise ValueError(f'a key repeats among {_shown(sorted(keys))}')
  return dict(pairs)


def _read_header(path: str):
  """({tensor: entry}, where the data starts), checked before anything is allocated."""
  try:
    with open(path, 'rb') as f:
      file_size = os.fstat(f.fileno()).st_size
      raw_length = f.read(8)
      if len(raw_length) != 8:
        raise CheckpointError(f'{path} is not a safetensors file (shorter than its header)')
      (length,) = struct.unpack('<Q', raw_length)
      if length > MAX_HEADER_BYTES or 8 + length > file_size:
        raise CheckpointError(f'{path}: the header length field says {length} bytes; a '
                              f'safetensors header holds at most {MAX_HEADER_BYTES} and this '
                              f'file has {file_size - 8} after the field')
      raw_header = f.read(length)
  except OSError as e:
    raise CheckpointError(f'{path} cannot be read ({e.strerror})') from None
  try:
    header = json.loads(raw_header.decode('utf-8'), object_pairs_hook=_unique_keys)
  except (ValueError, RecursionError) as e:
    raise CheckpointError(f'{path}: unreadable safetensors header ({e}); expected UTF-8 '
                          'JSON') from None
  if not isinstance(header, dict):
    raise CheckpointError(f'{path}: the safetensors header is {_shown(header)}, not a JSON '
                          'object')
  metadata = header.pop('__metadata__', None)
  if metadata is not None and not (isinstance(metadata, dict) and all(
      isinstance(value, str) for value in metadata.values())):
    raise CheckpointError(f'{path}: __metadata__ is {_shown(metadata)}, not an object of '
                          'strings')
  data_size = file_size - 8 - length
  for name, entry in header.items():
    _check_entry(path, name, entry, data_size)
  _check_layout(path, header, data_size)
  return header, 8 + length


def _shard_files(index_path: str) -> dict:
  """{tensor: shard file name} of a sharded checkpoint's index."""
  index = read_json(index_path, CheckpointError)
  weight_map = index.get('weight_map') if isinstance(index, dict) else None
  if not isinstance(weight_map, dict):
    raise CheckpointError(f'{index_path} has no "weight_map" object (tensor name -> file)')
  for tensor, name in weight_map.items():
    # A plain file name: the index must not reach outside the checkpoint's folder.
    if not (isinstance(name, str) and name.endswith('.safetensors')
            and os.path.basename(name) == name and name != '.safetensors'):
      raise CheckpointError(f'{index_path}: weight_map[{tensor!r}] is {_shown(name)}, not the '
                            'name of a .safetensors file beside the index')
  return weight_map


def _checkpoint_files(directory: str) -> list:
  """The safetensors files of a checkpoint directory: its index's, or model.safetensors."""
  index_path = os.path.join(directory, INDEX_FILE)
  if os.path.exists(index_path):
    return sorted(set(_shard_files(index_path).values()))
  if os.path.exists(os.path.join(directory, SINGLE_FILE)):
    return [SINGLE_FILE]
  raise CheckpointError(f'{directory} holds neither {SINGLE_FILE} nor {INDEX_FILE}')


class Checkpoint:
  """The tensors of a checkpoint directory by name, read one at a time on demand."""

  def __init__(self, directory: str, files: list | None = None):
    """files: the names of the safetensors files to read; default: the checkpoint's."""
    self._where = {}
    for name in files if files is not None else _checkpoint_files(directory):
      path = os.path.join(directory, name)
      if not os.path.isfile(path):
        raise CheckpointError(f'{path} is missing or is not a file')
      header, data_start = _read_header(path)
      for tensor, entry in header.items():
        if tensor in self._where:
          raise CheckpointError(f'tensor {tensor!r} is in both {self._where[tensor][0]} and '
                                f'{path}')
        self._where[tensor] = (path, data_start, entry)

  def names(self):
    return set(self._where)

  def __contains__(self, name):
    return name in self._where

  def read(self, name: str) -> np.ndarray:
    """The tensor as a read-only memory map; its header entry was checked on opening."""
    if name not in self._where:
      raise CheckpointError(f'the checkpoint has no tensor {name!r}')
    path, data_start, entry = self._where[name]
    if entry['dtype'] not in DTYPES:
      raise CheckpointError(f'{path}: tensor {name!r} has dtype {entry["dtype"]}, which is not '
                            f'supported ({", ".join(DTYPES)})')
    begin, _ = entry['data_offsets']
    return np.memmap(path, dtype=DTYPES[entry['dtype']], mode='r', offset=data_start + begin,
                     shape=tuple(entry['shape']))


def write(path: str, tensors: dict):
  """Writes {name: numpy array} as one safetensors file, tensors in name order."""
  header, offset = {'__metadata__': {'format': 'pt'}}, 0
  arrays = {name: np.ascontiguousarray(tensors[name]) for name in sorted(tensors)}
  for name, array in arrays.items():
    if array.dtype not in CODES:
      raise CheckpointError(f'{name}: cannot store dtype {array.dtype} in safetensors')
    header[name] = {'dtype': CODES[array.dtype], 'shape': list(array.shape),
                    'data_offsets': [offset, offset + array.nbytes]}
    offset += array.nbytes
  encoded = json.dumps(header, separators=(',', ':')).encode()
  encoded += b' ' * (-len(encoded) % 8)  # Keeps the data 8-byte aligned, as the spec advises.
  with open(path, 'xb') as f:
    f.write(struct.pack('<Q', len(encoded)))
    f.write(encoded)
    for array in arrays.values():
      f.write(array.tobytes())
