"""GGUF files written here with llama.cpp's `gguf` writer from tiny random transformers
models: our model and tokenizer read from them against transformers' own GGUF loading of the
same file (logits within 1e-4, the same token ids, the same greedy reply through main.py)."""
import json

import jax.numpy as jnp
import numpy as np
import pytest

from test_hf import hf_logits, hf_model
from test_hf_tokenizer import LLAMA3_SPLIT, QWEN2_SPLIT, random_text, trained_tokenizer
from test_main import assert_one_error_line, run_main, run_mains
from lmlab.data import gguf_tokenizer
from lmlab.data.errors import DataError
from lmlab.data.tokenizer import load_tokenizer
from lmlab.models import hf
from lmlab.models.errors import CheckpointError

gguf = pytest.importorskip('gguf')
torch = pytest.importorskip('torch')
transformers = pytest.importorskip('transformers')
pytest.importorskip('accelerate')  # transformers' GGUF loading needs it.
Q = gguf.GGMLQuantizationType

TEMPLATE = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n"
            "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
def llama_cpp_order(rows, n_heads):
  """llama.cpp's converter's order of LLaMA's q/k rows: rotary dimensions i and i + d/2 of
  each head next to each other."""
  return rows.reshape(n_heads, 2, rows.shape[0] // n_heads // 2, *rows.shape[1:]).swapaxes(
      1, 2).reshape(rows.shape)


def random_q4_k(rng, rows, columns):
  """Q4_K blocks of random codes (the gguf package cannot quantise to Q4_K): per 256 values,
  a float16 scale and minimum, 12 bytes of 6-bit sub-block scales and 128 bytes of codes."""
  blocks = rng.integers(0, 256, (rows, columns // 256, 144), dtype=np.uint8)
  for start in (0, 2):
    blocks[..., start:start + 2] = np.array([rng.uniform(1e-3, 2e-3)], np.float16).view(
        np.uint8)
  return blocks.reshape(rows, -1)


def write_gguf(model, tokenizer, path, architecture, qtype, rng):
  config = model.config
  writer = gguf.GGUFWriter(str(path), architecture)
  writer.add_block_count(config.num_hidden_layers)
  writer.add_context_length(config.max_position_embeddings)
  writer.add_embedding_length(config.hidden_size)
  writer.add_feed_forward_length(config.intermediate_size)
  writer.add_head_count(config.num_attention_heads)
  writer.add_head_count_kv(config.num_key_value_heads)
  writer.add_rope_freq_base(float(config.rope_parameters['rope_theta']))
  writer.add_layer_norm_rms_eps(config.rms_norm_eps)
  writer.add_vocab_size(config.vocab_size)
  document = json.loads(tokenizer.to_str())
  special = {added['id']: added['content'] for added in document['added_tokens']}
  ids = {**document['model']['vocab'], **{token: i for i, token in special.items()}}
  tokens = [token for token, _ in sorted(ids.items(), key=lambda item: item[1])]
  assert tokens == [tokens[i] for i in range(len(ids))]
  writer.add_tokenizer_model('gpt2')
  writer.add_tokenizer_pre('llama-bpe' if architecture == 'llama' else 'qwen2')
  writer.add_token_list(tokens)
  writer.add_token_types([3 if i in special else 1 for i in range(len(tokens))])
  writer.add_token_merges([' '.join(pair) if isinstance(pair, list) else pair
                           for pair in document['model']['merges']])
  writer.add_bos_token_id(0)
  writer.add_eos_token_id(tokens.index('<|im_end|>'))
  writer.add_chat_template(TEMPLATE)
  # llama.cpp's own table of Hugging Face tensor names.
  names = gguf.get_tensor_name_map(gguf.MODEL_ARCH[architecture.upper()],
                                   config.num_hidden_layers)
  gguf_name = lambda name: names.get_name(name, try_suffixes=('.weight', '.bias'))
  for name, value in model.state_dict().items():
    array = value.detach().numpy().astype(np.float32)
    if config.tie_word_embeddings and name == 'lm_head.weight':
      continue
    if architecture == 'llama' and '.q_proj.' in name:
      array = llama_cpp_order(array, config.num_attention_heads)
    if architecture == 'llama' and '.k_proj.' in name:
      array = llama_cpp_order(array, config.num_key_value_heads)
    if array.ndim == 1 or qtype == Q.F32:
      writer.add_tensor(gguf_name(name), array)
    elif qtype == Q.Q4_K and name.endswith('down_proj.weight'):
      writer.add_tensor(gguf_name(name), random_q4_k(rng, *array.shape), raw_dtype=Q.Q4_K)
    elif qtype == Q.Q4_K:
      writer.add_tensor(gguf_name(name), array.astype(np.float16))
    else:
      writer.add_tensor(gguf_name(name), gguf.quants.quantize(array, qtype), raw_dtype=qtype)
  writer.write_header_to_file()
  writer.write_kv_data_to_file()
  writer.write_tensors_to_file()
  writer.close()


def gguf_folder(tmp_path, rng, family, qtype, tied=False):
  """(transformers' model read from the GGUF file, the file's path)."""
  split = LLAMA3_SPLIT if family == 'Llama' else QWEN2_SPLIT
  tokenizer = trained_tokenizer(rng, split)
  tokenizer.add_special_tokens(['<|im_start|>', '<|im_end|>'])
  source = hf_model(family, dict(vocab_size=tokenizer.get_vocab_size(), intermediate_size=256,
                                 tie_word_embeddings=tied), int(rng.integers(1 << 30)))
  path = tmp_path / 'model.gguf'
  write_gguf(source, tokenizer, path, family.lower(), qtype, rng)
  reference = transformers.AutoModelForCausalLM.from_pretrained(
      str(tmp_path), gguf_file=path.name).eval()
  return reference, path


@pytest.mark.parametrize('family, qtype', [('Llama', Q.F16), ('Llama', Q.Q8_0),
                                           ('Qwen2', Q.Q4_0), ('Llama', Q.Q4_K),
                                           ('Qwen2', Q.F32)])
def test_logits_and_tokens_match_transformers_gguf_loading(tmp_path, rng, family, qtype):
  reference, path = gguf_folder(tmp_path, rng, family, qtype, tied=qtype == Q.F32)
  ours = hf.load(str(path))
  ids = rng.integers(0, reference.config.vocab_size, (2, 12))
  np.testing.assert_allclose(np.asarray(ours(jnp.asarray(ids))), hf_logits(reference, ids),
                             atol=1e-4, rtol=1e-4)
  tokenizer = load_tokenizer(str(path))
  reference_tokenizer = transformers.AutoTokenizer.from_pretrained(str(tmp_path),
                                                                   gguf_file=path.name)
  for _ in range(3):
    text = random_text(rng)
    assert tokenizer.encode_ordinary(text) == reference_tokenizer.encode(
        text, add_special_tokens=False)


def test_chat_through_main_replies_as_transformers(tmp_path, rng):
  """The GGUF file's own chat template and end-of-turn token; greedy, 24 tokens."""
  reference, path = gguf_folder(tmp_path, rng, 'Qwen2', Q.Q8_0)
  prompt = 'the cat sat on the mat?'
  out = run_main('--mode=chat', f'--hf_checkpoint={path}', f'--workdir={tmp_path / "run"}',
                 f'--prompt={prompt}', '--temperature=0', '--max_new_tokens=24').stdout
  reference_tokenizer = transformers.AutoTokenizer.from_pretrained(str(tmp_path),
                                                                   gguf_file=path.name)
  end = reference_tokenizer.convert_tokens_to_ids('<|im_end|>')
  ids = reference_tokenizer.apply_chat_template([{'role': 'user', 'content': prompt}],
                                                add_generation_prompt=True, tokenize=True)
  ids = torch.tensor([ids['input_ids'] if hasattr(ids, 'keys') else ids])
  with torch.no_grad():
    new = reference.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False,
                             max_new_tokens=24, eos_token_id=end)[0, ids.shape[1]:].tolist()
  new = new[:new.index(end)] if end in new else new
  assert out.rstrip('\n') == reference_tokenizer.decode(new)


def test_bad_gguf_files_are_one_error_line(tmp_path, rng):
  _, path = gguf_folder(tmp_path, rng, 'Llama', Q.F16)
  data = path.read_bytes()
  truncated = tmp_path / 'truncated.gguf'
  truncated.write_bytes(data[:len(data) // 2])
  other = tmp_path / 'other.gguf'
  writer = gguf.GGUFWriter(str(other), 'mamba')
  writer.add_tensor('token_embd.weight', np.zeros((4, 32), np.float32))
  writer.write_header_to_file()
  writer.write_kv_data_to_file()
  writer.write_tensors_to_file()
  writer.close()
  for bad, message in [(truncated, 'truncated'), (other, "architecture 'mamba'")]:
    with pytest.raises(CheckpointError, match=message):
      hf.load(str(bad))
  results = run_mains(*[['--mode=generate', f'--hf_checkpoint={bad}', '--prompt=a',
                         f'--workdir={tmp_path / bad.stem}'] for bad in (truncated, other)],
                      check=False)
  for result, message in zip(results, ['truncated', "architecture 'mamba'"]):
    assert_one_error_line(result, message)


@pytest.mark.parametrize('family, gguf_type', [('Llama', 'f32'), ('Qwen2', 'f16'),
                                               ('Llama', 'q8_0')])
def test_export_reads_back_in_transformers(tmp_path, rng, family, gguf_type):
  """main.py --gguf_out of a Hugging Face folder: transformers' GGUF loading gives the
  folder's logits (its matrices rounded to float16 for f16; Q8_0: our reading of the same
  bytes), its tokenizer's ids, and llama.cpp's reader finds the chat template and end token."""
  tokenizer = trained_tokenizer(rng, LLAMA3_SPLIT if family == 'Llama' else QWEN2_SPLIT)
  tokenizer.add_special_tokens(['<|im_start|>', '<|im_end|>'])
  source = hf_model(family, dict(vocab_size=tokenizer.get_vocab_size(), intermediate_size=64),
                    int(rng.integers(1 << 30)))
  folder, out = tmp_path / 'hf', tmp_path / 'gguf' / 'model.gguf'
  source.save_pretrained(folder)
  tokenizer.save(str(folder / 'tokenizer.json'))
  out.parent.mkdir()
  command = ['--mode=convert', f'--hf_checkpoint={folder}', f'--gguf_out={out}',
             f'--gguf_type={gguf_type}', '--chat_template=chatml',
             f'--workdir={tmp_path / "run"}']
  assert run_main(*command).stdout.startswith(f'wrote {out}')
  reference = transformers.AutoModelForCausalLM.from_pretrained(
      str(out.parent), gguf_file=out.name).eval()
  ids = rng.integers(0, tokenizer.get_vocab_size(), (2, 12))
  if gguf_type == 'f16':
    with torch.no_grad():
      for parameter in source.parameters():
        if parameter.ndim == 2:
          parameter.copy_(parameter.half().float())
  expected = (np.asarray(hf.load(str(out))(jnp.asarray(ids))) if gguf_type == 'q8_0'
              else hf_logits(source, ids))
  np.testing.assert_allclose(hf_logits(reference, ids), expected, atol=1e-4, rtol=1e-4)
  reference_tokenizer = transformers.AutoTokenizer.from_pretrained(str(out.parent),
                                                                   gguf_file=out.name)
  text = random_text(rng)
  assert reference_tokenizer.encode(text, add_special_tokens=False) == tokenizer.encode(
      text, add_special_tokens=False).ids
  fields = gguf.GGUFReader(str(out)).fields
  assert '<|im_start|>' in fields['tokenizer.chat_template'].contents()
  assert fields['tokenizer.ggml.eos_token_id'].contents() == tokenizer.token_to_id('<|im_end|>')
  again = run_main(*command, check=False)
  assert_one_error_line(again, f'{out} exists')


def test_a_pre_tokeniser_not_read_here_is_refused():
  values = {'tokenizer.ggml.model': 'gpt2', 'tokenizer.ggml.pre': 'tekken',
            'tokenizer.ggml.tokens': ['a']}
  with pytest.raises(DataError, match="tokenizer.ggml.pre 'tekken'"):
    gguf_tokenizer.tokenizer_json('m.gguf', values)
