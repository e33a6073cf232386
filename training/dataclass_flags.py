"""absl flags made from config dataclasses, so that a new option is one field in one place.

  define(TrainConfig)                       # --steps, --batch_size, ... with the fields' types
  train_config = from_flags(TrainConfig)    # the dataclass of the parsed flags

A field becomes a flag of its name, type (bool, int, float, str, a Literal of choices, or any
of them | None) and default. Its help text is its comment: the comment lines right above the
field and a comment at the end of its line, joined.
"""
import ast
import dataclasses
import functools
import inspect
import io
import textwrap
import tokenize
import types
import typing

from absl import flags

# Flags defined through this module belong to the module that calls define(), so that its
# --help lists them.
flags.disclaim_key_flags()

_DEFINE = {bool: flags.DEFINE_bool, int: flags.DEFINE_integer, float: flags.DEFINE_float,
           str: flags.DEFINE_string}


@functools.cache
def field_comments(cls) -> dict[str, str]:
  """{field name: its comment text} of a dataclass, read from its source."""
  source = textwrap.dedent(inspect.getsource(cls))
  comments = {token.start[0]: token.string.lstrip('#').strip()
              for token in tokenize.generate_tokens(io.StringIO(source).readline)
              if token.type == tokenize.COMMENT}
  lines = source.splitlines()
  texts = {}
  for node in ast.parse(source).body[0].body:
    if not (isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name)):
      continue
    above, line = [], node.lineno - 1
    while line in comments and lines[line - 1].lstrip().startswith('#'):
      above.insert(0, comments[line])
      line -= 1
    trailing = [comments[node.lineno]] if node.lineno in comments else []
    texts[node.target.id] = ' '.join(above + trailing)
  return texts


def _base_type(annotation):
  """The annotation without `| None`."""
  if isinstance(annotation, types.UnionType) or typing.get_origin(annotation) is typing.Union:
    args = [a for a in typing.get_args(annotation) if a is not type(None)]
    if len(args) == 1:
      return args[0]
  return annotation


def define(cls, *, names: dict | None = None, flag_values=flags.FLAGS):
  """Defines a flag per field of `cls`; names maps a field to another flag name."""
  hints = typing.get_type_hints(cls)
  comments = field_comments(cls)
  for field in dataclasses.fields(cls):
    name = (names or {}).get(field.name, field.name)
    kind = _base_type(hints[field.name])
    if not comments.get(field.name):
      raise TypeError(f'{cls.__name__}.{field.name} has no comment to be the help of --{name}')
    if typing.get_origin(kind) is typing.Literal:
      flags.DEFINE_enum(name, field.default, typing.get_args(kind), comments[field.name],
                        flag_values=flag_values)
    elif kind in _DEFINE:
      _DEFINE[kind](name, field.default, comments[field.name], flag_values=flag_values)
    else:
      raise TypeError(f'{cls.__name__}.{field.name}: no flag type for {hints[field.name]}')


def from_flags(cls, *, names: dict | None = None, flag_values=flags.FLAGS, **fixed):
  """An instance of `cls` from the parsed flags (as define() named them); `fixed` fields
  take the values given instead."""
  values = {field.name: flag_values[(names or {}).get(field.name, field.name)].value
            for field in dataclasses.fields(cls)}
  return cls(**{**values, **fixed})
