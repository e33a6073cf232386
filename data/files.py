"""Reading text files strictly, and writing files so that nothing already on disk is lost."""
import os
import tempfile

from lmlab.data.errors import DataError


def write_new_file(path: str, data: bytes, *, overwrite: bool = False):
  """Writes `path` whole or not at all; refuses an existing file unless overwrite."""
  directory = os.path.dirname(os.path.abspath(path))
  os.makedirs(directory, exist_ok=True)
  handle, temporary = tempfile.mkstemp(dir=directory, prefix=os.path.basename(path) + '.',
                                       suffix='.partial')
  try:
    with os.fdopen(handle, 'wb') as f:
      f.write(data)
    if overwrite:
      os.replace(temporary, path)
    else:
      try:
        os.link(temporary, path)  # Unlike a check then a rename, fails if `path` appears meanwhile.
      except FileExistsError:
        raise DataError(f'{path} already exists; pass overwrite=True or another path') from None
  finally:
    if os.path.exists(temporary):
      os.remove(temporary)


def _universal_newlines(text: str) -> str:
  """CRLF and lone CR line ends as LF, as Python's text files read them."""
  return text.replace('\r\n', '\n').replace('\r', '\n')


def read_text(path: str) -> str:
  """A UTF-8 text file's text, its line ends (any convention) as LF; a DataError names the
  first line that is not UTF-8."""
  try:
    with open(path, 'rb') as f:
      raw = f.read()
  except OSError as error:
    raise DataError(f'{path} cannot be read ({error.strerror})') from None
  try:
    text = raw.decode('utf-8')
  except UnicodeDecodeError as error:
    line = _universal_newlines(raw[:error.start].decode('utf-8')).count('\n') + 1
    raise DataError(f'{path}, line {line}, is not UTF-8 text ({error.reason} at byte '
                    f'{error.start}); pass a UTF-8 file') from None
  return _universal_newlines(text)


def read_lines(path: str) -> list[str]:
  """The lines of a UTF-8 text file (see read_text), without their newlines."""
  return read_text(path).split('\n')
