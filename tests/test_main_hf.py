"""main.py with --hf_checkpoint: sampling, evaluation and conversion both ways, against the
transformers model the checkpoint came from."""
import json
import os
import shutil

import numpy as np
import pytest

from test_hf import hf_logits, hf_model
from test_main import run_main, run_mains

torch = pytest.importorskip('torch')
transformers = pytest.importorskip('transformers')

BYTES_VOCAB = 257  # The byte tokenizer: 256 bytes and <|endoftext|>.


@pytest.fixture
def llama_dir(rng, tmp_path):
  model = hf_model('Llama', dict(vocab_size=BYTES_VOCAB, max_position_embeddings=128),
                   int(rng.integers(1 << 30)))
  model.save_pretrained(tmp_path / 'hf')
  return model, str(tmp_path / 'hf')


def test_greedy_sample_from_a_checkpoint_matches_transformers(llama_dir, tmp_path):
  from lmlab.data.tokenizer import byte_tokenizer
  model, path = llama_dir
  tokenizer = byte_tokenizer()
  prompt = 'def f(x):'
  out = run_main('--mode=generate', f'--hf_checkpoint={path}', '--tokenizer=bytes',
                 f'--workdir={tmp_path / "run"}', f'--prompt={prompt}', '--temperature=0',
                 '--max_new_tokens=12').stdout
  ids = torch.tensor([tokenizer.encode_ordinary(prompt)])
  with torch.no_grad():
    new = model.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False,
                         max_new_tokens=12)[0, ids.shape[1]:].tolist()
  eos = model.config.eos_token_id
  new = new[:new.index(eos)] if eos in new else new
  assert out.rstrip('\n') == prompt + tokenizer.decode(new, errors='replace')


def test_convert_to_a_workdir_and_back(llama_dir, tmp_path, corpus_dir, rng):
  model, path = llama_dir
  workdir, exported = str(tmp_path / 'run'), str(tmp_path / 'exported')
  common = ['--tokenizer=bytes', f'--data={corpus_dir}', '--seq_len=32', '--batch_size=2',
            '--eval_batches=2']
  _, from_hf = run_mains(
      ['--mode=convert', f'--hf_checkpoint={path}', f'--workdir={workdir}', *common],
      ['--mode=eval', f'--hf_checkpoint={path}', f'--workdir={tmp_path / "e"}', *common])
  from_workdir, _ = run_mains(['--mode=eval', f'--workdir={workdir}', f'--data={corpus_dir}'],
                              ['--mode=convert', f'--workdir={workdir}', f'--hf_out={exported}'])
  assert from_hf.stdout.split(': loss')[1] == from_workdir.stdout.split(': loss')[1]

  reloaded = transformers.AutoModelForCausalLM.from_pretrained(exported).eval()
  ids = rng.integers(0, BYTES_VOCAB, (2, 10))
  np.testing.assert_array_equal(hf_logits(reloaded, ids), hf_logits(model, ids))

  again = run_main('--mode=convert', f'--workdir={workdir}', f'--hf_out={exported}', check=False)
  assert again.returncode == 1 and 'not an empty directory' in again.stderr


def test_hf_checkpoint_errors(llama_dir, tmp_path):
  _, path = llama_dir
  changed, no_tokenizer = run_mains(
      ['--mode=generate', f'--hf_checkpoint={path}', '--tokenizer=bytes', '--set', 'n_layers=3'],
      ['--mode=generate', f'--hf_checkpoint={path}'], check=False)
  assert changed.returncode == 1 and 'n_layers' in changed.stderr
  assert no_tokenizer.returncode == 1 and 'tokenizer.json' in no_tokenizer.stderr
  with open(os.path.join(path, 'config.json')) as f:
    config = json.load(f)
  with open(os.path.join(path, 'config.json'), 'w') as f:
    json.dump({**config, 'architectures': ['T5ForConditionalGeneration']}, f)
  unsupported = run_main('--mode=eval', f'--hf_checkpoint={path}', '--tokenizer=bytes',
                         check=False)
  assert unsupported.returncode == 1
  assert unsupported.stderr.count('\n') == 1 and 'not supported' in unsupported.stderr


def test_corrupt_safetensors_is_one_error_line_naming_the_file(llama_dir, rng, tmp_path):
  """A garbage header length and offsets past the end, each in a copy of the checkpoint,
  evaluated side by side."""
  _, path = llama_dir
  with open(os.path.join(path, 'model.safetensors'), 'rb') as f:
    contents = f.read()
  corrupted = {'garbage header length': rng.bytes(8) + contents[8:],
               'offsets past the end': contents[:-4]}
  copies = [str(tmp_path / f'corrupt{i}') for i in range(len(corrupted))]
  for copy, corrupt in zip(copies, corrupted.values()):
    shutil.copytree(path, copy)
    with open(os.path.join(copy, 'model.safetensors'), 'wb') as f:
      f.write(corrupt)
  results = run_mains(*[['--mode=eval', f'--hf_checkpoint={copy}', '--tokenizer=bytes']
                        for copy in copies], check=False)
  for corruption, copy, result in zip(corrupted, copies, results):
    assert result.returncode == 1, corruption
    assert result.stderr.count('\n') == 1 and result.stderr.startswith('error: '), corruption
    assert os.path.join(copy, 'model.safetensors') in result.stderr, corruption


# Llama-2's chat layout: the reply ends with eos, which is where generation stops.
LLAMA2_STYLE_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}{% if m['role'] == 'user' %}[INST] {{ m['content'] }}"
    " [/INST]{% else %} {{ m['content'] }}{{ eos_token }}{% endif %}{% endfor %}")


def test_chat_with_the_folders_template_and_tokenizer_matches_transformers(rng, tmp_path):
  """A folder with a SentencePiece-style tokenizer.json and a chat template in
  tokenizer_config.json: main.py's greedy reply and continuation are transformers' for 32
  tokens."""
  from test_library_tokenizer import sentencepiece_bpe
  tokenizer_config = sentencepiece_bpe(rng, legacy=False)
  n_vocab = max(tokenizer_config['model']['vocab'].values()) + 1
  # hf_model's bos and eos ids, 1 and 2, are <s> and </s> here.
  model = hf_model('Llama', dict(vocab_size=n_vocab, max_position_embeddings=256),
                   int(rng.integers(1 << 30)))
  folder = tmp_path / 'hf'
  model.save_pretrained(folder)
  (folder / 'tokenizer.json').write_text(json.dumps(tokenizer_config), encoding='utf-8')
  (folder / 'tokenizer_config.json').write_text(json.dumps({
      'tokenizer_class': 'PreTrainedTokenizerFast', 'bos_token': '<s>', 'eos_token': '</s>',
      'chat_template': LLAMA2_STYLE_TEMPLATE}))
  prompt = 'the cat sat on the mat? 🙂'
  out, generated = (result.stdout for result in run_mains(*[
      [f'--mode={mode}', f'--hf_checkpoint={folder}', f'--workdir={tmp_path / mode}',
       f'--prompt={prompt}', '--temperature=0', '--max_new_tokens=32']
      for mode in ('chat', 'generate')]))
  reference = transformers.AutoTokenizer.from_pretrained(str(folder))
  # --mode=generate: the prompt and its continuation read as one text (the space that
  # begins the continuation kept).
  ids = torch.tensor([reference.encode(prompt, add_special_tokens=False)])
  with torch.no_grad():
    whole = model.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False,
                           max_new_tokens=32, eos_token_id=2)[0].tolist()
  whole = whole[:whole.index(2)] if 2 in whole else whole
  assert generated.rstrip('\n') == reference.decode(whole, skip_special_tokens=False)
  ids = reference.apply_chat_template([{'role': 'user', 'content': prompt}],
                                      add_generation_prompt=True, tokenize=True)
  ids = torch.tensor([ids['input_ids'] if hasattr(ids, 'keys') else ids])
  with torch.no_grad():
    new = model.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False,
                         max_new_tokens=32, eos_token_id=2)[0, ids.shape[1]:].tolist()
  new = new[:new.index(2)] if 2 in new else new
  assert out.rstrip('\n') == reference.decode(new, skip_special_tokens=False)
