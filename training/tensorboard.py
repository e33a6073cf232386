"""TensorBoard scalars without TensorFlow: an events file that `tensorboard --logdir` reads.

  writer = EventsWriter(workdir)      # <workdir>/events.out.tfevents.<time>.<host>.<pid>
  writer.scalars(step, {'train/loss': 2.31, 'eval/loss': 2.40})

The file is a sequence of TFRecords, each an `Event` protocol buffer (tensorflow/core/util/
event.proto): the first holds the file version, each later one a step's `Summary` of simple
values. A record is its length (uint64), a masked CRC-32C of the length, the bytes, and a
masked CRC-32C of the bytes, all little-endian. The few fields written are encoded here by
hand, so that neither TensorFlow nor a protobuf library is needed.
"""
import os
import socket
import struct
import time


def _crc32c_table() -> list[int]:
  table = []
  for byte in range(256):
    crc = byte
    for _ in range(8):
      crc = (crc >> 1) ^ (0x82F63B78 if crc & 1 else 0)
    table.append(crc)
  return table


_TABLE = _crc32c_table()


def crc32c(data: bytes) -> int:
  """CRC-32C (Castagnoli), the checksum of TFRecords."""
  crc = 0xFFFFFFFF
  for byte in data:
    crc = _TABLE[(crc ^ byte) & 0xFF] ^ (crc >> 8)
  return crc ^ 0xFFFFFFFF


def _masked(crc: int) -> int:
  return (((crc >> 15) | (crc << 17)) + 0xA282EAD8) & 0xFFFFFFFF


def record(data: bytes) -> bytes:
  """One TFRecord holding data."""
  length = struct.pack('<Q', len(data))
  return (length + struct.pack('<I', _masked(crc32c(length))) + data
          + struct.pack('<I', _masked(crc32c(data))))


def _varint(value: int) -> bytes:
  out = bytearray()
  while True:
    byte, value = value & 0x7F, value >> 7
    out.append(byte | (0x80 if value else 0))
    if not value:
      return bytes(out)


def _field(number: int, payload: bytes) -> bytes:
  """A length-delimited protobuf field (wire type 2)."""
  return _varint(number << 3 | 2) + _varint(len(payload)) + payload


def event(wall_time: float, step: int, *, file_version: str | None = None,
          scalars: dict[str, float] | None = None) -> bytes:
  """An Event: wall_time (field 1, double), step (2, int64), file_version (3) or a summary
  (5) whose values (1) each hold a tag (1) and a simple_value (2, float)."""
  out = b'\x09' + struct.pack('<d', wall_time) + b'\x10' + _varint(step)
  if file_version is not None:
    out += _field(3, file_version.encode())
  if scalars:
    values = b''.join(_field(1, _field(1, tag.encode()) + b'\x15' + struct.pack('<f', value))
                      for tag, value in scalars.items())
    out += _field(5, values)
  return out


class EventsWriter:
  """Appends events to a new events file of `folder`, each write flushed."""

  def __init__(self, folder: str):
    name = f'events.out.tfevents.{int(time.time())}.{socket.gethostname()}.{os.getpid()}'
    self.path = os.path.join(folder, name)
    self._file = open(self.path, 'ab')
    self._write(event(time.time(), 0, file_version='brain.Event:2'))

  def _write(self, data: bytes):
    self._file.write(record(data))
    self._file.flush()

  def scalars(self, step: int, values: dict[str, float]):
    self._write(event(time.time(), step, scalars=values))

  def close(self):
    self._file.close()
