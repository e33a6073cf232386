"""Writing files so that nothing already on disk is lost."""
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
