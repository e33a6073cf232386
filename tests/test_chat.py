"""Chat data for fine-tuning: templates against transformers' apply_chat_template and the
documented formats, loss masks by token ids, special tokens, packing, and bad JSONL."""
import dataclasses
import itertools
import json

import numpy as np
import pytest

from lmlab.data import bpe, chat, sft_batches
from lmlab.data.chat_template import BUILT_IN, ChatTemplate, chat_template, render
from lmlab.data.errors import DataError
from lmlab.data.tokenizer import END_OF_TEXT
from lmlab.data.wordpiece import WordPieceTokenizer

# Words, whitespace, markup and template-like text, none of them special tokens.
WORDS = ['the', 'cat', 'sat', "it's", '中文', '🙂', 'naïve', '42', '<b>', 'a&b', '"q"', '\\',
         '{{ x }}', '{% if %}', '[INST]', '\n', '\n\n', '\t', '  ']

# Hugging Face-style templates, as a model's tokenizer_config.json might carry them.
# Zephyr-like: a tag per role, eos after every turn, unknown roles refused; block tags indented
# (lstrip_blocks removes the indent).
TAGGED = """\
{% for message in messages %}
  {% if message['role'] not in ['system', 'user', 'assistant'] %}
    {{ raise_exception('unknown role ' + message['role']) }}
  {% endif %}
<|{{ message['role'] }}|>
{{ message['content'] }}{{ eos_token }}
{% endfor %}
{% if add_generation_prompt %}
  <|assistant|>
{% endif %}"""
# Mistral-like: the system message joins the first user turn; roles must alternate.
INSTRUCT = """\
{{ bos_token }}
{%- set ns = namespace(system='') %}
{%- if messages[0]['role'] == 'system' %}
{%- set ns.system = messages[0]['content'] + '\n\n' %}
{%- set rest = messages[1:] %}
{%- else %}
{%- set rest = messages %}
{%- endif %}
{%- for message in rest %}
{%- if (message['role'] == 'user') != (loop.index0 is even) %}
{{- raise_exception('turns must go user, assistant, user, ...') }}
{%- endif %}
{%- if message['role'] == 'user' %}
{{- '[INST] ' + (ns.system if loop.first else '') + message['content'] + ' [/INST]' }}
{%- else %}
{{- message['content'] + eos_token }}
{%- endif %}
{%- endfor %}"""
# Gemma-like: 'model' for the assistant, a turn-end token that is not eos, generation blocks.
TURNS = """\
{{ bos_token }}
{% for message in messages %}
{% if message.role == 'system' %}{% continue %}{% endif %}
{% set prefix = messages[0].content + '\n\n' if loop.index0 == 1 and messages[0].role == 'system'
   else '' %}
<start_of_turn>{{ 'model' if message.role == 'assistant' else message.role }}
{% if message.role == 'assistant' %}
{% generation %}{{ message.content | trim }}<end_of_turn>{% endgeneration %}

{% else %}
{{ prefix + message.content | trim }}<end_of_turn>
{% endif %}
{% endfor %}
{% if add_generation_prompt %}
<start_of_turn>model
{% endif %}"""
# Function-calling-like: tools when given, then every message as a JSON object; a bos_token
# that this model (like Qwen) does not have.
JSON_LINES = """\
{{ bos_token }}
{%- if tools is not none %}
<|tools|>{{ tools | tojson }}<|end|>
{% endif %}
{% for message in messages %}
<|msg|>{{ message | tojson }}<|end|>
{% endfor %}
{% if add_generation_prompt %}<|msg|>{"role": "assistant", "content": "{% endif %}"""

HF_STYLE = {
    'tagged': ChatTemplate('tagged', TAGGED, special_tokens=('</s>',), end_token='</s>',
                           eos_token='</s>'),
    'instruct': ChatTemplate('instruct', INSTRUCT, special_tokens=('<s>', '</s>'),
                             end_token='</s>', bos_token='<s>', eos_token='</s>'),
    'turns': ChatTemplate('turns', TURNS, special_tokens=('<bos>', '<start_of_turn>',
                                                          '<end_of_turn>'),
                          end_token='<end_of_turn>', bos_token='<bos>', eos_token='<eos>'),
    'json_lines': ChatTemplate('json_lines', JSON_LINES, special_tokens=('<|msg|>', '<|end|>'),
                               end_token='<|end|>'),
}
ALL_TEMPLATES = {**BUILT_IN, **HF_STYLE}


def random_content(rng):
  return ''.join(rng.choice(WORDS, rng.integers(0, 12)))


def random_conversation(rng, *, end_with_assistant=True):
  """An optional system message, then user and assistant turns by turns."""
  n_turns = 2 * int(rng.integers(1, 4)) - (0 if end_with_assistant else int(rng.integers(2)))
  roles = ['user', 'assistant'] * 4
  messages = [{'role': role, 'content': random_content(rng)} for role in roles[:n_turns]]
  if rng.random() < 0.5:
    messages.insert(0, {'role': 'system', 'content': random_content(rng)})
  return messages


@pytest.fixture
def hf_render():
  """render(template, messages, add_generation_prompt) by transformers' apply_chat_template."""
  transformers = pytest.importorskip('transformers')
  tokenizers = pytest.importorskip('tokenizers')

  def render_with_transformers(template, messages, add_generation_prompt=False):
    model = tokenizers.models.WordLevel({'[UNK]': 0}, unk_token='[UNK]')
    special = {f'{kind}_token': token for kind, token in (('bos', template.bos_token),
                                                         ('eos', template.eos_token)) if token}
    tokenizer = transformers.PreTrainedTokenizerFast(
        tokenizer_object=tokenizers.Tokenizer(model), **special)
    return tokenizer.apply_chat_template(messages, chat_template=template.source, tokenize=False,
                                         add_generation_prompt=add_generation_prompt)
  return render_with_transformers


@pytest.mark.parametrize('name', ALL_TEMPLATES)
def test_rendering_equals_transformers(name, rng, hf_render):
  template = ALL_TEMPLATES[name]
  for _ in range(4):
    messages = random_conversation(rng, end_with_assistant=bool(rng.integers(2)))
    for add_generation_prompt in (False, True):
      assert (render(template, messages, add_generation_prompt=add_generation_prompt)
              == hf_render(template, messages, add_generation_prompt))


@pytest.mark.parametrize('name', ['llama2', 'tagged', 'instruct'])
def test_templates_refuse_what_transformers_refuses(name, rng, hf_render):
  template = ALL_TEMPLATES[name]
  messages = random_conversation(rng)
  at = int(rng.integers(len(messages)))
  if name == 'tagged':
    messages.insert(at, {'role': 'tool', 'content': random_content(rng)})
  else:  # Two messages of a role in a row.
    messages.insert(at, dict(messages[at]))
  with pytest.raises(Exception, match='role|turns'):
    hf_render(template, messages)
  with pytest.raises(DataError, match=f"chat template '{name}' fails on the conversation: "
                     '.*(role|turns)'):
    render(template, messages)


def test_templates_run_in_an_immutable_sandbox(rng, hf_render):
  """A template from a model folder is untrusted code: it may not change its inputs."""
  template = ChatTemplate('popping', '{% set _ = messages.pop() %}{{ messages | length }}',
                          special_tokens=(), end_token='')
  messages = random_conversation(rng)
  with pytest.raises(Exception, match='unsafe'):
    hf_render(template, messages)
  with pytest.raises(DataError, match="'popping' fails on the conversation: .*unsafe"):
    render(template, messages)


def documented(name, messages, add_generation_prompt=False):
  """The formats as their authors document them."""
  if name == 'chatml':
    turns = ''.join(f'<|im_start|>{m["role"]}\n{m["content"]}<|im_end|>\n' for m in messages)
    return turns + ('<|im_start|>assistant\n' if add_generation_prompt else '')
  if name == 'llama3':
    turns = ''.join(f'<|start_header_id|>{m["role"]}<|end_header_id|>\n\n'
                    f'{m["content"].strip()}<|eot_id|>' for m in messages)
    prompt = '<|start_header_id|>assistant<|end_header_id|>\n\n' if add_generation_prompt else ''
    return f'<|begin_of_text|>{turns}{prompt}'
  # Llama 2 (Meta's chat_completion): the system message opens the first user turn, and the
  # stripped user turn of each pair goes between [INST] and [/INST].
  assert name == 'llama2'
  if messages[0]['role'] == 'system':
    system, first = messages[0]['content'], messages[1]['content']
    messages = [{'role': 'user', 'content': f'<<SYS>>\n{system}\n<</SYS>>\n\n{first}'},
                *messages[2:]]
  text = ''
  for i in range(0, len(messages), 2):
    text += f'<s>[INST] {messages[i]["content"].strip()} [/INST]'
    if i + 1 < len(messages):
      text += f' {messages[i + 1]["content"].strip()} </s>'
  return text


@pytest.mark.parametrize('name', BUILT_IN)
def test_built_in_templates_render_the_documented_formats(name, rng):
  for _ in range(6):
    messages = random_conversation(rng, end_with_assistant=bool(rng.integers(2)))
    for add_generation_prompt in (False, True):
      assert (render(BUILT_IN[name], messages, add_generation_prompt=add_generation_prompt)
              == documented(name, messages, add_generation_prompt))


def trained_part(name, content):
  """What an assistant turn trains on: its content and end token, as the template renders
  them."""
  return {'chatml': f'{content}<|im_end|>', 'llama3': f'{content.strip()}<|eot_id|>',
          'llama2': f' {content.strip()} </s>', 'turns': f'{content.strip()}<end_of_turn>'}[name]


@pytest.fixture
def small_bpe(rng):
  texts = [random_content(rng) for _ in range(60)]
  ranks = bpe.train_bpe(texts, 256 + int(rng.integers(20, 80)), pattern=bpe.PATTERNS['gpt2'],
                        special_tokens=[END_OF_TEXT])
  return bpe.build_encoding('small', ranks, pattern=bpe.PATTERNS['gpt2'],
                            special_tokens=bpe.special_token_ids(ranks, [END_OF_TEXT]),
                            source='the test')


def mask_runs(mask):
  """(start, end) of each run of True."""
  edges = np.flatnonzero(np.diff(np.concatenate([[0], mask.astype(int), [0]])))
  return list(zip(edges[::2], edges[1::2]))


@pytest.mark.parametrize('name', ['chatml', 'llama2', 'llama3', 'turns'])
def test_loss_mask_covers_exactly_the_assistant_replies_and_end_tokens(name, rng, small_bpe):
  template = ALL_TEMPLATES[name]
  tokenizer, _ = chat.with_special_tokens(small_bpe, template.special_tokens)
  specials = set(template.special_tokens)
  for _ in range(4):
    messages = random_conversation(rng)
    ids, mask = chat.encode_conversation(template, tokenizer, messages)
    assert ids.dtype == np.int32 and mask.dtype == bool and ids.shape == mask.shape
    expected_text = documented(name, messages) if name in BUILT_IN else render(template, messages)
    assert tokenizer.decode(ids.tolist()) == expected_text
    replies = [m['content'] for m in messages if m['role'] == 'assistant']
    runs = mask_runs(mask)
    assert len(runs) == len(replies)
    for (start, end), reply in zip(runs, replies):
      expected = tokenizer.encode(trained_part(name, reply), allowed_special=specials)
      assert ids[start:end].tolist() == expected
      assert ids[end - 1] == tokenizer.encode_single_token(template.end_token)


def test_a_template_whose_prefixes_are_not_prefixes_cannot_be_masked(rng, small_bpe):
  source = '{{ messages | length }}<|im_end|>' + BUILT_IN['chatml'].source
  counting = dataclasses.replace(BUILT_IN['chatml'], name='counting', source=source)
  tokenizer, _ = chat.with_special_tokens(small_bpe, counting.special_tokens)
  with pytest.raises(DataError, match="'counting' does not render chat.jsonl:7 up to message "
                     '.* cannot be told apart'):
    chat.encode_conversation(counting, tokenizer, random_conversation(rng), where='chat.jsonl:7')


def test_special_tokens_are_added_after_the_vocabulary_once(rng, small_bpe):
  new = ['<|im_start|>', '<|im_end|>']
  extended, added = chat.with_special_tokens(small_bpe, [END_OF_TEXT, *new, new[0]])
  assert added == new
  assert extended.n_vocab == small_bpe.n_vocab + 2
  assert [extended.encode_single_token(token) for token in [END_OF_TEXT, *new]] == [
      small_bpe.encode_single_token(END_OF_TEXT), small_bpe.max_token_value + 1,
      small_bpe.max_token_value + 2]
  text = random_content(rng)
  assert extended.encode_ordinary(text) == small_bpe.encode_ordinary(text)
  joined = extended.encode(f'{text}<|im_end|>{text}', allowed_special=set(new))
  assert joined == [*small_bpe.encode_ordinary(text), small_bpe.max_token_value + 2,
                    *small_bpe.encode_ordinary(text)]
  again, none_added = chat.with_special_tokens(extended, new)
  assert again is extended and none_added == []


def test_chat_needs_the_template_tokens_in_a_byte_level_tokenizer(rng, small_bpe):
  with pytest.raises(DataError, match=r"lacks the special tokens \['<\|im_end\|>', "):
    chat.encode_conversation(BUILT_IN['chatml'], small_bpe, random_conversation(rng))
  with pytest.raises(DataError, match='needs? a byte-level BPE'):
    chat.with_special_tokens(WordPieceTokenizer(['[UNK]', 'a']), ['<s>'])


def write_folder(folder, config, jinja=None):
  folder.mkdir()
  (folder / 'tokenizer_config.json').write_text(json.dumps(config), encoding='utf-8')
  if jinja is not None:
    (folder / 'chat_template.jinja').write_text(jinja, encoding='utf-8')
  return str(folder)


def test_folder_template_as_transformers_saves_it(rng, tmp_path, hf_render):
  transformers = pytest.importorskip('transformers')
  tokenizers = pytest.importorskip('tokenizers')
  model = tokenizers.models.WordLevel({'[UNK]': 0}, unk_token='[UNK]')
  saved = transformers.PreTrainedTokenizerFast(
      tokenizer_object=tokenizers.Tokenizer(model), bos_token='<bos>', eos_token='<eos>',
      additional_special_tokens=['<start_of_turn>', '<end_of_turn>', '<unused>'])
  saved.chat_template = TURNS
  saved.save_pretrained(str(tmp_path / 'gemma'))
  loaded = transformers.PreTrainedTokenizerFast.from_pretrained(str(tmp_path / 'gemma'))
  template = chat_template(str(tmp_path / 'gemma'))
  assert (template.name, template.source) == ('gemma', TURNS)
  assert (template.bos_token, template.eos_token) == ('<bos>', '<eos>')
  assert set(template.special_tokens) == {'<bos>', '<start_of_turn>', '<end_of_turn>'}
  assert template.end_token == '<end_of_turn>'
  for _ in range(3):
    messages = random_conversation(rng, end_with_assistant=bool(rng.integers(2)))
    assert render(template, messages, add_generation_prompt=True) == loaded.apply_chat_template(
        messages, tokenize=False, add_generation_prompt=True)


def test_folder_template_from_a_list_in_tokenizer_config(tmp_path):
  config = {'bos_token': {'content': '<s>', 'special': True}, 'eos_token': '</s>',
            'added_tokens_decoder': {'0': {'content': '<s>'}, '1': {'content': '</s>'},
                                     '2': {'content': '<|unused|>'}},
            'chat_template': [{'name': 'tool_use', 'template': 'tools'},
                              {'name': 'default', 'template': INSTRUCT}]}
  template = chat_template(write_folder(tmp_path / 'mistral', config))
  assert template.source == INSTRUCT and template.bos_token == '<s>'
  assert template.special_tokens == ('<s>', '</s>') and template.end_token == '</s>'
  # A chat_template.jinja beside it is the template, as transformers reads it.
  assert chat_template(write_folder(tmp_path / 'both', config, TAGGED)).source == TAGGED


def test_turn_end_is_the_first_special_token_after_a_reply(tmp_path):
  source = BUILT_IN['chatml'].source + '{{ eos_token }}'
  added = {str(i): {'content': token, 'special': True}
           for i, token in enumerate(['<|endoftext|>', '<|im_start|>', '<|im_end|>', '<|x|>'])}
  config = {'chat_template': source, 'eos_token': '<|endoftext|>', 'bos_token': None,
            'added_tokens_decoder': added}
  template = chat_template(write_folder(tmp_path / 'qwen', config))
  assert template.end_token == '<|im_end|>'
  assert set(template.special_tokens) == {'<|endoftext|>', '<|im_start|>', '<|im_end|>'}


@pytest.mark.parametrize('config, jinja, message', [
    ({'chat_template': [{'name': 'tool_use', 'template': 'x'}]}, None,
     'none named "default"'),
    ({}, None, 'neither a chat_template.jinja nor'),
    ({}, '{% for %}', 'not valid Jinja'),
    ({'eos_token': '</s>'}, '{% for m in messages %}{{ m.content }}\n{% endfor %}',
     'none of the special tokens'),
])
def test_unusable_folder_templates_are_errors(tmp_path, config, jinja, message):
  with pytest.raises(DataError, match=message):
    chat_template(write_folder(tmp_path / 'model', config, jinja))


def test_unknown_template_spec_is_an_error(tmp_path):
  with pytest.raises(DataError, match="'chatml3' is neither a built-in"):
    chat_template('chatml3')
  with pytest.raises(DataError, match='not a JSON object'):
    chat_template(write_folder(tmp_path / 'x', ['not', 'an', 'object']))


def random_conversations(rng, count, seq_len):
  """EncodedConversations, each starting with its own id: the first two fill seq_len exactly,
  most are short, some longer than seq_len + 1, one just that long, one a token longer, three
  single tokens."""
  lengths = [int(rng.integers(2, seq_len // 2)) if rng.random() < 0.8
             else int(rng.integers(seq_len // 2, 2 * seq_len)) for _ in range(count)]
  lengths[0] = int(rng.integers(2, seq_len + 1))
  lengths[1] = seq_len - lengths[0] + 2
  for index, length in zip(rng.choice(range(2, count), 5, replace=False),
                           [seq_len + 1, seq_len + 2, 1, 1, 1]):
    lengths[index] = length
  conversations = []
  for index, length in enumerate(lengths):
    ids = np.concatenate([[1000 + index], rng.integers(0, 999, length - 1)]).astype(np.int32)
    conversations.append(chat.EncodedConversation(ids, rng.random(length) < 0.5))
  return conversations


def segments_of(batch, row):
  """[(conversation index or None for padding, its slice)] of a row, read from its arrays."""
  segment_ids, positions = batch['segment_ids'][row], batch['positions'][row]
  starts = [0, *np.flatnonzero(np.diff(segment_ids)) + 1]
  ends = [*starts[1:], len(segment_ids)]
  found = []
  for number, (start, end) in enumerate(zip(starts, ends)):
    assert np.all(segment_ids[start:end] == number)
    assert positions[start:end].tolist() == list(range(end - start))
    first = batch['inputs'][row, start]
    is_padding = number == len(starts) - 1 and not np.any(batch['loss_mask'][row, start:])
    found.append((None if is_padding and first < 1000 else first - 1000, slice(start, end)))
  return found


def check_segment(batch, row, span, conversation, seq_len):
  n = min(len(conversation.token_ids) - 1, seq_len)
  assert span.stop - span.start == n
  assert batch['inputs'][row, span].tolist() == conversation.token_ids[:n].tolist()
  assert batch['targets'][row, span].tolist() == conversation.token_ids[1:n + 1].tolist()
  assert batch['loss_mask'][row, span].tolist() == conversation.loss_mask[1:n + 1].tolist()


def packed_rows(conversations, *, seed, step, batch_size, seq_len):
  """The conversation indices of each row by the documented packing: conversations in the order
  of permutations drawn from np.random.default_rng([seed, step]), passing over single tokens
  (they predict nothing), each into the first row with room for it, until one fits in no row."""
  order_rng = np.random.default_rng([seed, step])
  draws = itertools.chain.from_iterable(
      order_rng.permutation(len(conversations)) for _ in itertools.count())
  rows, room = [[] for _ in range(batch_size)], [seq_len] * batch_size
  for index in draws:
    n = min(len(conversations[index].token_ids) - 1, seq_len)
    if n == 0:
      continue
    fitting = [row for row in range(batch_size) if room[row] >= n]
    if not fitting:
      return rows
    rows[fitting[0]].append(index)
    room[fitting[0]] -= n


def test_train_batch_packs_whole_conversations_as_a_pure_function_of_seed_and_step(rng):
  seq_len, batch_size = int(rng.integers(8, 40)), int(rng.integers(2, 5))
  conversations = random_conversations(rng, int(rng.integers(10, 60)), seq_len)
  seed, first_step = int(rng.integers(1 << 30)), int(rng.integers(1 << 20))
  batches = []
  for step in range(first_step, first_step + 5):
    batch = sft_batches.train_batch(conversations, seed=seed, step=step, batch_size=batch_size,
                                    seq_len=seq_len)
    assert batch.keys() == set(sft_batches.KEYS)
    assert all(array.shape == (batch_size, seq_len) and array.dtype == np.int32
               for array in batch.values())
    rows = []
    for row in range(batch_size):
      segments = segments_of(batch, row)
      for index, span in segments:
        if index is None:
          assert not batch['inputs'][row, span].any()
        else:
          check_segment(batch, row, span, conversations[index], seq_len)
      rows.append([index for index, _ in segments if index is not None])
    assert rows == packed_rows(conversations, seed=seed, step=step, batch_size=batch_size,
                               seq_len=seq_len)
    batches.append(batch)
  again = sft_batches.train_batch(conversations, seed=seed, step=first_step,
                                  batch_size=batch_size, seq_len=seq_len)
  assert all(np.array_equal(batches[0][key], again[key]) for key in again)
  assert not all(np.array_equal(batches[0][key], batches[1][key]) for key in again)


def test_eval_batches_hold_every_conversation_once_in_order(rng):
  seq_len, batch_size = int(rng.integers(8, 40)), int(rng.integers(1, 5))
  conversations = random_conversations(rng, int(rng.integers(7, 40)), seq_len)
  predictions = lambda index: min(len(conversations[index].token_ids) - 1, seq_len)
  rows = []
  for batch in sft_batches.eval_batches(conversations, batch_size=batch_size, seq_len=seq_len):
    for row in range(batch_size):
      placed = [(index, span) for index, span in segments_of(batch, row) if index is not None]
      for index, span in placed:
        check_segment(batch, row, span, conversations[index], seq_len)
      rows.append([index for index, _ in placed])
  while not rows[-1]:  # The last batch's missing rows.
    rows.pop()
  assert [index for row in rows for index in row] == [
      i for i, c in enumerate(conversations) if len(c.token_ids) > 1]
  # A row ends only when the next conversation does not fit in it.
  for row, following in zip(rows, rows[1:]):
    assert seq_len - sum(map(predictions, row)) < predictions(following[0])
  too_long = sum(len(c.token_ids) > seq_len + 1 for c in conversations)
  assert sft_batches.count_truncated(conversations, seq_len) == too_long


def test_batches_need_a_conversation_to_predict(rng):
  single_tokens = [chat.EncodedConversation(np.array([5], np.int32), np.array([True]))] * 3
  with pytest.raises(DataError, match='no conversation has the two tokens'):
    sft_batches.train_batch(single_tokens, seed=0, step=0, batch_size=2, seq_len=8)


def random_examples(rng):
  examples, lines = [], []
  for _ in range(int(rng.integers(0, 5))):
    if rng.random() < 0.5:
      prompt, completion = random_content(rng), random_content(rng)
      lines.append(json.dumps({'prompt': prompt, 'completion': completion, 'id': 7}))
      examples.append([{'role': 'user', 'content': prompt},
                       {'role': 'assistant', 'content': completion}])
    else:
      examples.append(random_conversation(rng))
      lines.append(json.dumps({'messages': examples[-1]}, ensure_ascii=bool(rng.integers(2))))
    lines += [''] * int(rng.integers(0, 2))
  return examples, lines


def test_examples_read_from_jsonl(rng, tmp_path):
  examples, lines = random_examples(rng)
  last = {'prompt': random_content(rng), 'completion': random_content(rng)}
  path = tmp_path / 'chat.jsonl'
  path.write_text('\n'.join([' \t', *lines, json.dumps(last)]), encoding='utf-8')
  read = chat.read_examples(str(path))
  assert [example.messages for example in read] == [
      *examples, [{'role': 'user', 'content': last['prompt']},
                  {'role': 'assistant', 'content': last['completion']}]]
  assert read[-1].where == f'{path}:{len(lines) + 2}'


BAD_LINES = {
    'not JSON': '{"messages": [',
    'not an object': '[1, 2]',
    'no "messages" list and no "prompt"': '{"prompt": "only a prompt"}',
    'not a list': '{"messages": {"role": "user"}}',
    'message 0 of "messages" is .* not an object of exactly': '{"messages": [{"role": "user"}]}',
    'message 1 of "messages" is .* not an object of exactly': (
        '{"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": 3}]}'),
    "message 1 of \"messages\" has the role 'robot'": (
        '{"messages": [{"role": "user", "content": "a"}, {"role": "robot", "content": "b"}]}'),
    'message 0 of "messages" is .*"name".* not an object of exactly': (
        '{"messages": [{"role": "user", "content": "a", "name": "b"}]}'),
    'no assistant turn': '{"messages": [{"role": "user", "content": "a"}]}',
    'both "messages" and "prompt"': '{"messages": [], "prompt": "a", "completion": "b"}',
}


@pytest.mark.parametrize('message', BAD_LINES)
def test_bad_example_is_an_error_naming_file_and_line(message, rng, tmp_path):
  _, lines = random_examples(rng)
  path = tmp_path / 'chat.jsonl'
  path.write_text('\n'.join([*lines, BAD_LINES[message], *lines]), encoding='utf-8')
  with pytest.raises(DataError, match=f'^{path}:{len(lines) + 1}: .*{message}') as error:
    chat.read_examples(str(path))
  assert '\n' not in str(error.value)


def test_empty_or_undecodable_examples_file_is_an_error(rng, tmp_path):
  path = tmp_path / 'chat.jsonl'
  path.write_text('\n' * int(rng.integers(0, 3)), encoding='utf-8')
  with pytest.raises(DataError, match='holds no chat examples'):
    chat.read_examples(str(path))
  _, lines = random_examples(rng)
  path.write_bytes(b''.join(line.encode() + b'\n' for line in lines) + b'{"prompt": "\xff"}')
  with pytest.raises(DataError, match=f'line {len(lines) + 1}, is not UTF-8'):
    chat.read_examples(str(path))
