"""Which text files make a corpus, and which of them are held out for validation.

The default corpus is the Python standard library of the running interpreter: real
text on every machine, carried by no repository. `--data` names a file, a directory
or a glob of UTF-8 text files instead.
"""
import dataclasses
import glob
import hashlib
import os
import sysconfig

from lmlab.data.errors import DataError

STDLIB_EXCLUDED_DIRS = ('test', 'tests', 'idlelib', 'site-packages', '__pycache__')


@dataclasses.dataclass(frozen=True)
class Document:
  path: str
  relpath: str
  # Byte range of the file that belongs to this split; (0, None) is the whole file.
  start: int = 0
  end: int | None = None


def stdlib_files():
  root = sysconfig.get_paths()['stdlib']
  found = []
  for directory, subdirs, names in os.walk(root):
    subdirs[:] = sorted(d for d in subdirs if d not in STDLIB_EXCLUDED_DIRS)
    found += [os.path.join(directory, n) for n in sorted(names) if n.endswith('.py')]
  return root, found


def files_of(data: str):
  """(root, sorted regular files) of a file, a directory (recursively) or a glob."""
  if os.path.isfile(data):
    return os.path.dirname(os.path.abspath(data)), [os.path.abspath(data)]
  if os.path.isdir(data):
    found = []
    for directory, subdirs, names in os.walk(data):
      subdirs[:] = sorted(d for d in subdirs if not d.startswith('.'))
      found += [os.path.join(directory, n) for n in sorted(names) if not n.startswith('.')]
    return os.path.abspath(data), [os.path.abspath(f) for f in found]
  matches = sorted(os.path.abspath(f) for f in glob.glob(data, recursive=True)
                   if os.path.isfile(f))
  if not matches:
    raise DataError(f'--data={data!r}: no such file or directory, and no file matches it '
                    'as a glob')
  return os.path.commonpath([os.path.dirname(f) for f in matches]), matches


def _hash_fraction(relpath: str) -> float:
  digest = hashlib.sha1(relpath.encode('utf-8')).digest()
  return int.from_bytes(digest[:8], 'big') / 2.0**64


def _char_boundary(path: str, offset: int) -> int:
  """The first offset at or after `offset` that does not fall inside a UTF-8 character."""
  with open(path, 'rb') as f:
    f.seek(offset)
    following = f.read(4)
  continuation = next((i for i, b in enumerate(following) if b & 0xC0 != 0x80),
                      len(following))
  return offset + continuation


def split_corpus(data: str | None, val_fraction: float):
  """{'train': [Document], 'val': [Document]}, the same on every run.

  Files go to validation by a hash of their relative path. A corpus of one file is
  split inside the file instead: its last val_fraction of bytes is validation.
  """
  root, paths = stdlib_files() if data is None else files_of(data)
  paths = [p for p in paths if os.path.getsize(p) > 0]
  if not paths:
    raise DataError(f'--data={data!r}: no non-empty files found; pass a text file, a '
                    'directory or a glob of text files')
  if len(paths) == 1:
    size = os.path.getsize(paths[0])
    cut = _char_boundary(paths[0], int(size * (1.0 - val_fraction)))
    name = os.path.basename(paths[0])
    return {'train': [Document(paths[0], name, 0, cut)],
            'val': [Document(paths[0], name, cut, size)]}
  docs = sorted((Document(p, os.path.relpath(p, root)) for p in paths),
                key=lambda d: _hash_fraction(d.relpath))
  n_val = min(len(docs) - 1, max(1, sum(_hash_fraction(d.relpath) < val_fraction for d in docs)))
  return {'train': sorted(docs[n_val:], key=lambda d: d.relpath),
          'val': sorted(docs[:n_val], key=lambda d: d.relpath)}


def _safe_cut(buffer: bytes) -> int:
  """The end of the last line in `buffer` after which splitting cannot change tokenisation.

  That is just past a newline that has a non-space byte on both sides: every
  pre-tokenisation pattern in use ends a piece at such a newline either way. -1 if none.
  """
  at = len(buffer) - 1
  while True:
    at = buffer.rfind(b'\n', 1, at)
    if at == -1:
      return -1
    if not buffer[at - 1:at].isspace() and not buffer[at + 1:at + 2].isspace():
      return at + 1
    at -= 1


def text_chunks(doc: Document, chunk_bytes: int = 1 << 22):
  """Yields (text, had bytes that are not UTF-8) pieces of about chunk_bytes of a document.

  Memory stays bounded by a few chunks however large the file. Bytes that are not UTF-8
  become U+FFFD.
  """
  end = os.path.getsize(doc.path) if doc.end is None else doc.end
  buffer = b''
  with open(doc.path, 'rb') as f:
    f.seek(doc.start)
    position = doc.start
    while position < end or buffer:
      block = f.read(min(chunk_bytes, end - position)) if position < end else b''
      position += len(block)
      buffer += block
      at_end = position >= end
      if not at_end and len(buffer) < chunk_bytes:
        continue
      cut = len(buffer) if at_end else _safe_cut(buffer)
      if cut <= 0:
        if len(buffer) < 4 * chunk_bytes:
          continue  # A very long line: read on until it ends.
        # No safe place at all: split anyway, before the last character begins.
        cut = len(buffer) - 1
        while cut > 0 and buffer[cut] & 0xC0 == 0x80:
          cut -= 1
        cut = cut or len(buffer)  # Nothing but continuation bytes: not text anyway.
      piece, buffer = buffer[:cut], buffer[cut:]
      try:
        yield piece.decode('utf-8'), False
      except UnicodeDecodeError:
        yield piece.decode('utf-8', errors='replace'), True


def texts_of(docs):
  """The text of `docs`, chunk by chunk (bounded memory), for tokenizer training."""
  return (text for doc in docs for text, _ in text_chunks(doc))


def fingerprint(splits, extra: str) -> str:
  """Changes when any file, its size, its time stamp, the split or `extra` changes."""
  h = hashlib.sha1(extra.encode())
  for name in sorted(splits):
    for doc in splits[name]:
      stat = os.stat(doc.path)
      h.update(f'{name}|{doc.path}|{doc.start}|{doc.end}|{stat.st_size}|'
               f'{stat.st_mtime_ns}\n'.encode())
  return h.hexdigest()
