"""Fine-tuning through main.py: SFT of LoRA adapters on a pre-trained run, chat, merge and
export to Hugging Face peft; QLoRA's quantised start; prompt tuning, exported likewise."""
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from lmlab.models import hf, lora
from lmlab.models.hf import adapters
from lmlab.models.errors import ConfigError
from lmlab.models.hf import peft as hf_peft
from lmlab.training import run as run_lib
from test_main import SMALL, assert_one_error_line, expect_error, metrics, run_main, run_mains
from test_qlora import QLORA_FLAGS, check_quantised_from

torch = pytest.importorskip('torch')
transformers = pytest.importorskip('transformers')

LORA = ['--peft=lora', '--lora_rank=2', '--lora_alpha=4', '--lora_targets=q,v,down']


def logits(model, tokens):
  return np.asarray(nnx.jit(lambda model, tokens: model(tokens))(model, jnp.asarray(tokens)))


def adapted_shapes(config, new_tokens: int) -> int:
  """Parameters LoRA adds: per block and target, rank * (d_in + d_out); and a row of the
  embedding and of the (untied) head for each of new_tokens, the template's new tokens."""
  head = config.n_heads * config.resolved_head_dim
  kv = config.n_kv_heads * config.resolved_head_dim
  sizes = {'q': (config.d_model, head), 'v': (config.d_model, kv),
           'down': (config.ffn_dim, config.d_model)}
  return config.n_layers * sum(config.lora_rank * (d_in + d_out) for d_in, d_out in
                               (sizes[name] for name in config.lora_target_names)) + (
      new_tokens * config.d_model * (1 if config.tie_embeddings else 2))


@pytest.fixture
def base(tmp_path, corpus_dir):
  """A pre-trained run to fine-tune."""
  workdir = str(tmp_path / 'base')
  run_main(*SMALL, f'--data={corpus_dir}', f'--workdir={workdir}', '--steps=4')
  return workdir


def test_lora_sft_and_prompt_tuning_runs_train_only_their_parameters_and_export(
    tmp_path, base, corpus_dir, rng):
  tuned = str(tmp_path / 'tuned')
  words = ['alpha', 'beta', 'gamma', 'delta']
  chats = tmp_path / 'chats.jsonl'
  chats.write_text(''.join(json.dumps({'prompt': str(rng.choice(words)),
                                       'completion': str(rng.choice(words))}) + '\n'
                           for _ in range(40)), encoding='utf-8')
  quantised, prompted = str(tmp_path / 'quantised'), str(tmp_path / 'prompted')
  # Prompt tuning too (checked at the end): packed documents are refused; unpacked ones train
  # the prompt.
  prompt = ['--peft=prompt', '--prompt_tokens=3', f'--data={corpus_dir}', f'--init_from={base}']
  *trained, packed = run_mains(
      [*SMALL, *LORA, '--objective=sft', f'--data={chats}', f'--init_from={base}',
       f'--workdir={tuned}', '--steps=6', '--seq_len=32', '--learning_rate=3e-2'],
      [*SMALL, *QLORA_FLAGS, f'--data={corpus_dir}', f'--init_from={base}',
       f'--workdir={quantised}', '--steps=2'],
      [*SMALL, *prompt, '--document_masking=false', f'--workdir={prompted}', '--steps=3',
       '--learning_rate=3e-2'],
      [*SMALL, *prompt, f'--workdir={tmp_path / "packed"}', '--steps=1'], check=False)
  for result in trained:
    assert result.returncode == 0, result.stderr[-3000:]
  assert_one_error_line(packed, 'peft=prompt takes unpacked rows')
  check_quantised_from(base, quantised)

  before, after = run_lib.restore(base), run_lib.restore(tuned)
  config = nnx.merge(after.graphdef, after.params).config
  first = metrics(tuned)[0]
  # ChatML's two tokens are new to the byte tokenizer.
  assert first['trainable_params'] == adapted_shapes(config, new_tokens=2)
  assert first['params'] == first['trainable_params'] + sum(
      x.size for x in jax.tree.leaves(before.params))
  # Adam's two moments of the adapters, and its step count: nothing of the base.
  assert first['opt_state_bytes_per_device'] <= 2 * 4 * adapted_shapes(config, 2) + 64
  tuned_params = dict(nnx.to_flat_state(after.params))
  for path, value in nnx.to_flat_state(before.params):
    np.testing.assert_array_equal(tuned_params[path][...], value[...], err_msg=str(path))
  for name in ('lora_b', 'embedding_xd', 'head_xd'):  # They start at zero.
    assert any(np.abs(value[...]).max() > 0 for path, value in tuned_params.items()
               if path[-1] == name), name

  merged, exported, adapter = (str(tmp_path / name) for name in ('merged', 'base_hf', 'adapter'))
  reply, _, _ = run_mains(
      ['--mode=chat', f'--workdir={tuned}', '--prompt=alpha', '--temperature=0',
       '--max_new_tokens=4'],
      ['--mode=merge', f'--workdir={tuned}', f'--hf_out={merged}'],
      ['--mode=convert', f'--workdir={tuned}', f'--hf_out={exported}', f'--peft_out={adapter}'])
  # The reply: transformers' greedy continuation, on the merged model, of ChatML's prompt for
  # a user's 'alpha', up to the end of the turn.
  end = after.tokenizer.encode_single_token('<|im_end|>')
  prompt_ids = torch.tensor([after.tokenizer.encode(
      '<|im_start|>user\nalpha<|im_end|>\n<|im_start|>assistant\n', allowed_special='all')])
  with torch.no_grad():
    made = transformers.AutoModelForCausalLM.from_pretrained(merged).generate(
        prompt_ids, attention_mask=torch.ones_like(prompt_ids), do_sample=False,
        max_new_tokens=4, eos_token_id=end)[0, prompt_ids.shape[1]:].tolist()
  made = made[:made.index(end)] if end in made else made
  assert reply.stdout.rstrip('\n') == after.tokenizer.decode(made, errors='replace')

  model = nnx.merge(after.graphdef, after.params)
  tokens = rng.integers(0, 256, (2, 12))
  expected = logits(model, tokens)
  np.testing.assert_allclose(logits(hf.load(merged), tokens), expected, atol=1e-5)
  np.testing.assert_allclose(logits(hf_peft.load_lora(hf.load(exported), adapter), tokens),
                             expected, atol=1e-5)
  np.testing.assert_allclose(logits(lora.base_model(model), tokens),
                             logits(nnx.merge(before.graphdef, before.params), tokens), atol=0)

  with pytest.raises(ConfigError, match='no LoRA adapters'):
    run_lib.merge_lora(base, hf_out=str(tmp_path / 'no'), out_workdir=None)

  after = run_lib.restore(prompted)
  assert metrics(prompted)[0]['trainable_params'] == 3 * 32
  prompted_params = dict(nnx.to_flat_state(after.params))
  for path, value in nnx.to_flat_state(before.params):
    np.testing.assert_array_equal(prompted_params[path][...], value[...], err_msg=str(path))
  exported, adapter = str(tmp_path / 'prompt_base_hf'), str(tmp_path / 'prompt_adapter')
  run_lib.workdir_to_hf(prompted, exported, adapter)
  np.testing.assert_allclose(logits(adapters.load(hf.load(exported), adapter), tokens),
                             logits(nnx.merge(after.graphdef, after.params), tokens), atol=1e-5)


def test_bad_lora_flag_is_one_error_line(tmp_path):
  expect_error(f'--workdir={tmp_path / "run"}', '--steps=1', '--peft=lora', '--lora_rank=0',
               match='lora_rank=0 must be positive')
