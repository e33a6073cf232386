"""Checks of values read from JSON files, which may hold anything."""
import math


def is_finite_number(value) -> bool:
  """An int or a finite float, not a bool (which Python counts as an int)."""
  # Compared, not converted: an integer too large for a float must not raise.
  return type(value) in (int, float) and -math.inf < value < math.inf
