"""JSON files and the checks of values read from them, which may hold anything."""
import json
import math


def is_finite_number(value) -> bool:
  """An int or a finite float, not a bool (which Python counts as an int)."""
  # Compared, not converted: an integer too large for a float must not raise.
  return type(value) in (int, float) and -math.inf < value < math.inf


def read_json(path: str, error: type[Exception]):
  """The JSON value in `path`; an unreadable file or invalid JSON raises `error` naming it."""
  try:
    with open(path, encoding='utf-8') as f:
      return json.load(f)
  except OSError as e:
    raise error(f'{path} cannot be read ({e.strerror})') from None
  except (ValueError, RecursionError) as e:
    raise error(f'{path} is not UTF-8 JSON ({e})') from None
