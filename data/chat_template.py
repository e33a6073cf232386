"""Chat templates: Jinja text that renders a conversation as one string, as transformers does.

`chat_template(spec)` gives a built-in template by name (chatml, llama2, llama3) or the template
of a Hugging Face folder; `render` renders it in the environment of transformers'
`apply_chat_template`: an immutable sandbox with trim_blocks and lstrip_blocks, the loop
controls, `raise_exception(message)`, a `tojson` filter that leaves non-ASCII and HTML
characters as they are, and the variables `messages`, `add_generation_prompt`, `tools` and
`documents` (both None) and `bos_token`/`eos_token` (when the template has them). Unlike
transformers there is no `strftime_now`: a template that looks for it falls back to its fixed
date, so a rendering never depends on the day it is made.
"""
import dataclasses
import functools
import json
import os

import jinja2
import jinja2.ext
import jinja2.sandbox

from lmlab.data import gguf_tokenizer
from lmlab.data.errors import DataError
from lmlab.data.files import read_text


@dataclasses.dataclass(frozen=True)
class ChatTemplate:
  """A chat template and the tokens it depends on.

  special_tokens are the strings of its renderings that must each encode as one special id;
  end_token is the one that ends an assistant turn, where generation stops.
  """
  name: str
  source: str
  special_tokens: tuple[str, ...]
  end_token: str
  bos_token: str | None = None
  eos_token: str | None = None


# Qwen's ChatML: every turn `<|im_start|>{role}\n{content}<|im_end|>\n`.
_CHATML_SOURCE = """\
{% for message in messages %}
<|im_start|>{{ message.role }}
{{ message.content }}<|im_end|>
{% endfor %}
{% if add_generation_prompt %}
<|im_start|>assistant
{% endif %}
"""

# Meta's Llama 2 chat format (llama/generation.py, chat_completion): an optional system message
# goes inside the first user turn; each user turn and the reply after it are
# `<s>[INST] {user} [/INST] {reply} </s>`, contents stripped. A prompt ends at `[/INST]`.
_LLAMA2_SOURCE = """\
{% if messages[0].role == 'system' %}
{% set system_block = '<<SYS>>\n' + messages[0].content + '\n<</SYS>>\n\n' %}
{% set turns = messages[1:] %}
{% else %}
{% set system_block = '' %}
{% set turns = messages %}
{% endif %}
{% for message in turns %}
{% if message.role != ['user', 'assistant'][loop.index0 % 2] %}
{{ raise_exception('llama2 takes an optional system message, then user and assistant turns '
                   + 'by turns, starting with the user') }}
{% endif %}
{% if message.role == 'user' %}
{{ bos_token }}[INST] {{ ((system_block if loop.first else '') + message.content) | trim }} [/INST]
{%- else %}
 {{ message.content | trim }} {{ eos_token }}
{%- endif %}
{% endfor %}
"""

# Meta's Llama 3 chat format: `<|begin_of_text|>`, then every turn
# `<|start_header_id|>{role}<|end_header_id|>\n\n{content}<|eot_id|>`, contents stripped.
_LLAMA3_SOURCE = """\
{{ bos_token }}
{%- for message in messages %}
<|start_header_id|>{{ message.role }}<|end_header_id|>

{{ message.content | trim }}<|eot_id|>
{%- endfor %}
{% if add_generation_prompt %}
<|start_header_id|>assistant<|end_header_id|>

{% endif %}
"""

BUILT_IN = {template.name: template for template in (
    ChatTemplate('chatml', _CHATML_SOURCE, special_tokens=('<|im_start|>', '<|im_end|>'),
                 end_token='<|im_end|>', eos_token='<|im_end|>'),
    ChatTemplate('llama2', _LLAMA2_SOURCE, special_tokens=('<s>', '</s>'), end_token='</s>',
                 bos_token='<s>', eos_token='</s>'),
    ChatTemplate('llama3', _LLAMA3_SOURCE,
                 special_tokens=('<|begin_of_text|>', '<|start_header_id|>',
                                 '<|end_header_id|>', '<|eot_id|>'),
                 end_token='<|eot_id|>', bos_token='<|begin_of_text|>', eos_token='<|eot_id|>'),
)}


class _GenerationTag(jinja2.ext.Extension):
  """`{% generation %}...{% endgeneration %}` marks assistant text for transformers' assistant
  mask in some Hub templates; here it renders its body unchanged."""
  tags = {'generation'}

  def parse(self, parser):
    next(parser.stream)
    return parser.parse_statements(('name:endgeneration',), drop_needle=True)


def _raise_exception(message):
  raise jinja2.TemplateError(message)


def _to_json(value, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
  return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators,
                    sort_keys=sort_keys)


def _environment():
  environment = jinja2.sandbox.ImmutableSandboxedEnvironment(
      trim_blocks=True, lstrip_blocks=True,
      extensions=[_GenerationTag, jinja2.ext.loopcontrols])
  environment.filters['tojson'] = _to_json
  environment.globals['raise_exception'] = _raise_exception
  return environment


_ENVIRONMENT = _environment()


@functools.lru_cache(maxsize=32)
def _compiled(source: str):
  return _ENVIRONMENT.from_string(source)


def render(template: ChatTemplate, messages, *, add_generation_prompt: bool = False,
           where: str = 'the conversation') -> str:
  """The text of `messages` (a list of {'role', 'content'}); `where` names them in errors."""
  special = {name: value for name, value in (('bos_token', template.bos_token),
                                             ('eos_token', template.eos_token)) if value}
  try:
    return _compiled(template.source).render(
        messages=messages, add_generation_prompt=add_generation_prompt, tools=None,
        documents=None, **special)
  except (jinja2.TemplateError, TypeError) as error:
    raise DataError(f'chat template {template.name!r} fails on {where}: {error}') from None


def _json_object(path: str) -> dict:
  text = read_text(path)
  try:
    config = json.loads(text)
  except (ValueError, RecursionError) as error:
    raise DataError(f'{path} is not valid JSON ({error}); pass a tokenizer_config.json') from None
  if not isinstance(config, dict):
    raise DataError(f'{path} holds {type(config).__name__}, not a JSON object')
  return config


def _token_string(path: str, value, field: str) -> str | None:
  """A token as tokenizer_config.json writes it: a string, or an object with its "content"."""
  if isinstance(value, dict):
    value = value.get('content')
  if value is not None and not isinstance(value, str):
    raise DataError(f'{path}: {field} is {value!r:.60}, not a token string')
  return value


# The fields of tokenizer_config.json that list tokens: lists, or objects whose values are the
# tokens (added_tokens_decoder maps ids to them; transformers 5 may name extra special tokens).
_TOKEN_COLLECTIONS = ('added_tokens_decoder', 'additional_special_tokens', 'extra_special_tokens')


def _declared_tokens(path: str, config: dict) -> list[str]:
  """Every token string tokenizer_config.json declares."""
  entries = []
  for field in _TOKEN_COLLECTIONS:
    value = config.get(field) or []
    if not isinstance(value, (list, dict)):
      raise DataError(f'{path}: {field} is {value!r:.60}, not a list or an object')
    entries += [(field, entry) for entry in (value.values() if isinstance(value, dict) else value)]
  entries += [(field, config.get(field)) for field in ('bos_token', 'eos_token')]
  return [token for field, entry in entries if (token := _token_string(path, entry, field))]


def _config_source(folder: str, config_path: str, chat_template) -> str:
  """The `chat_template` of tokenizer_config.json: a string, or the 'default' of a list of
  {name, template}."""
  if isinstance(chat_template, str):
    return chat_template
  if not isinstance(chat_template, list):
    raise DataError(f'{folder} holds neither a chat_template.jinja nor a tokenizer_config.json '
                    'with a chat_template; pass a folder with a chat template or a built-in name')
  named = {entry.get('name'): entry.get('template') for entry in chat_template
           if isinstance(entry, dict)}
  if not isinstance(named.get('default'), str):
    raise DataError(f'{config_path}: chat_template lists the templates {sorted(map(str, named))} '
                    'and none named "default" with a template string')
  return named['default']


def _turn_end(template: ChatTemplate, folder: str) -> str:
  """The first of the template's special tokens after an assistant reply in its rendering."""
  reply = 'Reply.'
  messages = [{'role': 'user', 'content': 'Question?'}, {'role': 'assistant', 'content': reply}]
  text = render(template, messages, where='a user question and an assistant reply')
  after = text[text.rfind(reply) + len(reply):] if reply in text else ''
  found = [(after.find(token), -len(token), token) for token in template.special_tokens
           if token in after]
  if not found:
    raise DataError(f'the chat template of {folder} ends an assistant reply with none of the '
                    'special tokens of tokenizer_config.json, so generation could not stop at '
                    'the end of a turn; use a template that ends assistant turns with one')
  return min(found)[2]


def _folder_template(folder: str) -> ChatTemplate:
  """The chat template of a Hugging Face folder: chat_template.jinja if there is one (as
  transformers prefers it), else the chat_template of tokenizer_config.json. Its special tokens
  are the tokens tokenizer_config.json declares that its text holds, and bos and eos where it
  names their variables."""
  config_path = os.path.join(folder, 'tokenizer_config.json')
  jinja_path = os.path.join(folder, 'chat_template.jinja')
  config = _json_object(config_path) if os.path.isfile(config_path) else {}
  if os.path.isfile(jinja_path):
    source = read_text(jinja_path)
  else:
    source = _config_source(folder, config_path, config.get('chat_template'))
  bos, eos = (_token_string(config_path, config.get(field), field)
              for field in ('bos_token', 'eos_token'))
  return _template(folder, source, _declared_tokens(config_path, config), bos, eos)


def _template(where: str, source: str, declared: list[str], bos: str | None,
              eos: str | None) -> ChatTemplate:
  """The template `source` of `where` (a folder or GGUF file), whose special tokens are those
  of `declared` that its text holds, and bos and eos where it names their variables."""
  used = [token for token in declared if token in source]
  used += [token for variable, token in (('bos_token', bos), ('eos_token', eos))
           if token and variable in source]
  name = os.path.basename(os.path.normpath(where))
  try:
    _compiled(source)
  except jinja2.TemplateSyntaxError as error:
    raise DataError(f'the chat template of {where} is not valid Jinja (line {error.lineno}: '
                    f'{error.message})') from None
  provisional = ChatTemplate(name, source, special_tokens=tuple(dict.fromkeys(used)),
                             end_token='', bos_token=bos, eos_token=eos)
  return dataclasses.replace(provisional, end_token=_turn_end(provisional, where))


def _gguf_template(path: str) -> ChatTemplate:
  """The chat template of a GGUF file's metadata; its special tokens are the vocabulary's
  CONTROL tokens."""
  values = gguf_tokenizer.read_metadata(path)
  source = values.get('tokenizer.chat_template')
  if not isinstance(source, str) or not source:
    raise DataError(f'{path} has no tokenizer.chat_template; pass --chat_template')
  tokens = values.get('tokenizer.ggml.tokens') or []
  types = values.get('tokenizer.ggml.token_type') or []
  declared = [token for token, kind in zip(tokens, types) if kind == gguf_tokenizer.CONTROL]
  bos, eos = (tokens[i] if isinstance(i, int) and 0 <= i < len(tokens) else None
              for i in (values.get('tokenizer.ggml.bos_token_id'),
                        values.get('tokenizer.ggml.eos_token_id')))
  return _template(path, source, declared, bos, eos)


def has_template(folder: str) -> bool:
  """Whether a Hugging Face folder holds a chat template (chat_template.jinja, or a
  chat_template in a readable tokenizer_config.json), or a GGUF file one in its metadata."""
  if folder.endswith('.gguf'):
    return bool(gguf_tokenizer.read_metadata(folder).get('tokenizer.chat_template'))
  if os.path.isfile(os.path.join(folder, 'chat_template.jinja')):
    return True
  try:
    with open(os.path.join(folder, 'tokenizer_config.json'), encoding='utf-8') as f:
      config = json.load(f)
  except (OSError, ValueError, RecursionError):
    return False
  return isinstance(config, dict) and bool(config.get('chat_template'))


def chat_template(spec: str) -> ChatTemplate:
  """The built-in template named `spec`, or the template of the Hugging Face folder or GGUF
  file `spec`."""
  if spec in BUILT_IN:
    return BUILT_IN[spec]
  if spec.endswith('.gguf'):
    return _gguf_template(spec)
  if not os.path.isdir(spec):
    raise DataError(f'chat template {spec!r} is neither a built-in ({", ".join(BUILT_IN)}) nor '
                    'a folder with a tokenizer_config.json or chat_template.jinja')
  return _folder_template(spec)
