"""Reading and writing the safetensors format with numpy alone, bfloat16 included.

A file is an 8-byte little-endian header length, a JSON header mapping each tensor name
to its dtype, shape and byte range, then the raw little-endian data. The safetensors
package's numpy path cannot represent bfloat16, the dtype most checkpoints are stored in,
so tensors are read here as memory-mapped views (ml_dtypes supplies bfloat16): reading a
tensor touches only its own bytes, and a whole checkpoint is never in memory at once.
"""
import json
import os
import struct

import ml_dtypes
import numpy as np

from lmlab.models.errors import CheckpointError

DTYPES = {'F64': np.float64, 'F32': np.float32, 'F16': np.float16, 'BF16': ml_dtypes.bfloat16,
          'I64': np.int64, 'I32': np.int32, 'I16': np.int16, 'I8': np.int8, 'U8': np.uint8,
          'BOOL': np.bool_}
CODES = {np.dtype(dtype): code for code, dtype in DTYPES.items()}
INDEX_FILE = 'model.safetensors.index.json'
SINGLE_FILE = 'model.safetensors'


def _read_header(path: str):
  with open(path, 'rb') as f:
    raw_length = f.read(8)
    if len(raw_length) != 8:
      raise CheckpointError(f'{path} is not a safetensors file (shorter than its header)')
    (length,) = struct.unpack('<Q', raw_length)
    try:
      header = json.loads(f.read(length))
    except ValueError as e:
      raise CheckpointError(f'{path}: unreadable safetensors header ({e})') from None
  header.pop('__metadata__', None)
  return header, 8 + length


class Checkpoint:
  """The tensors of a checkpoint directory by name, read one at a time on demand."""

  def __init__(self, directory: str):
    index_path = os.path.join(directory, INDEX_FILE)
    if os.path.exists(index_path):
      with open(index_path) as f:
        files = sorted(set(json.load(f)['weight_map'].values()))
    elif os.path.exists(os.path.join(directory, SINGLE_FILE)):
      files = [SINGLE_FILE]
    else:
      raise CheckpointError(f'{directory} holds neither {SINGLE_FILE} nor {INDEX_FILE}')
    self._where = {}
    for name in files:
      path = os.path.join(directory, name)
      if not os.path.exists(path):
        raise CheckpointError(f'{INDEX_FILE} names {name}, which is missing from {directory}')
      header, data_start = _read_header(path)
      for tensor, entry in header.items():
        self._where[tensor] = (path, data_start, entry)

  def names(self):
    return set(self._where)

  def __contains__(self, name):
    return name in self._where

  def read(self, name: str) -> np.ndarray:
    if name not in self._where:
      raise CheckpointError(f'the checkpoint has no tensor {name!r}')
    path, data_start, entry = self._where[name]
    if entry['dtype'] not in DTYPES:
      raise CheckpointError(f'{name}: unsupported dtype {entry["dtype"]}')
    begin, end = entry['data_offsets']
    dtype = np.dtype(DTYPES[entry['dtype']])
    shape = tuple(entry['shape'])
    if end - begin != dtype.itemsize * int(np.prod(shape)):
      raise CheckpointError(f'{name}: byte range does not match shape {shape} {entry["dtype"]}')
    return np.memmap(path, dtype=dtype, mode='r', offset=data_start + begin, shape=shape)


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
