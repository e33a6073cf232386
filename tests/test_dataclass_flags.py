"""Flags made from config dataclasses: names, types, defaults and the comments as help."""
import dataclasses
from typing import Literal

import pytest
from absl import flags

from lmlab.training.config import TrainConfig
from lmlab.training.dataclass_flags import define, from_flags
from lmlab.training.optimizer import OptimizerConfig


@dataclasses.dataclass(frozen=True)
class Example:
  # Above the field,
  # on two lines.
  count: int = 3
  rate: float | None = None  # At the end of the line.
  name: str = 'x'  # A name.
  on: bool = True  # A switch.
  kind: Literal['a', 'b'] = 'a'  # One of two.


@dataclasses.dataclass(frozen=True)
class Undocumented:
  count: int = 3


def test_fields_become_flags(rng):
  values = flags.FlagValues()
  define(Example, names={'count': 'how_many'}, flag_values=values)
  count, rate = int(rng.integers(-50, 50)), float(rng.uniform())
  values([
      'prog', f'--how_many={count}', f'--rate={rate}', '--noon', '--kind=b'])
  assert from_flags(Example, names={'count': 'how_many'}, flag_values=values) == Example(
      count=count, rate=rate, name='x', on=False, kind='b')
  assert from_flags(Example, names={'count': 'how_many'}, flag_values=values,
                    name='y').name == 'y'
  assert values['how_many'].help == 'Above the field, on two lines.'
  assert values['rate'].help == 'At the end of the line.'
  assert values['rate'].default is None
  with pytest.raises(flags.IllegalFlagValueError):
    values['kind'].parse('c')


def test_a_field_without_a_comment_is_refused():
  with pytest.raises(TypeError, match='Undocumented.count has no comment'):
    define(Undocumented, flag_values=flags.FlagValues())


@pytest.mark.parametrize('config', [TrainConfig, OptimizerConfig])
def test_every_training_field_is_a_documented_flag(config):
  values = flags.FlagValues()
  define(config, flag_values=values)
  values(['prog'])
  assert from_flags(config, flag_values=values) == config()
