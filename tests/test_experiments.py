"""The experiment scripts end to end, in-process, on a tiny model and tiny data: each writes
its CSV, Markdown table and plots; the table agrees with the CSV; a grid run again skips
finished runs and resumes an interrupted one; bad flags are one error line."""
import csv
import json
import os
import statistics

import pytest
from absl import flags

from lmlab.data import arithmetic
from lmlab.experiments import (activations, alignment, attention_scale, attention_types,
                               finetuning, initialisation, model_compression, moe,
                               norm_placement, position_extrapolation, repetition)
from lmlab.models.config import ModelConfig
from lmlab.models.registry import param_count

# One checkpoint per run, the one at its end (what a rerun resumes from): each costs a second.
TINY = ['--steps=2', '--d_model=16', '--n_heads=2', '--n_layers=1', '--batch_size=2',
        '--seq_len=16', '--eval_every=1', '--eval_batches=1', '--log_every=1',
        '--save_every=100', '--warmup_steps=0', '--learning_rate=1e-2', '--seeds=1']


@pytest.fixture(scope='module')
def corpus(tmp_path_factory):
  folder = tmp_path_factory.mktemp('corpus')
  words = ['def', 'return', 'alpha', 'beta', '(', ')', ':', '\n', 'λ']
  for i in range(4):
    (folder / f'doc{i}.txt').write_text(' '.join(words[(i * 7 + j * j) % len(words)]
                                                  for j in range(300)), encoding='utf-8')
  return folder


def run_script(module, out, corpus, *args):
  """Runs a script's main in this process with TINY, then `args`, as its flags."""
  flags.FLAGS.unparse_flags()
  flags.FLAGS(['script', f'--out={out}', f'--data={corpus}', *TINY, *args])
  module.main(['script'])


def csv_rows(out):
  with open(os.path.join(out, 'results.csv'), newline='') as f:
    return list(csv.DictReader(f))


def table(out):
  """The rows of results.md's table as {header: cell}."""
  with open(os.path.join(out, 'results.md')) as f:
    lines = [line.strip() for line in f if line.startswith('|')]
  headers = [h.strip() for h in lines[0].strip('|').split('|')]
  return [dict(zip(headers, (c.strip() for c in line.strip('|').split('|')))) for line in lines[2:]]


def check_outputs(out, axes, header, key, n_rows, plot='loss_curves.png'):
  """CSV, table and plots (`plot` among them) exist; each table row's mean of `header` is the
  CSV's mean of `key` over the rows with the same axes values, and its run count their
  number."""
  rows = csv_rows(out)
  assert len(rows) == n_rows
  for table_row in table(out):
    members = [r for r in rows if all(r[a] == table_row[a] for a in axes)]
    assert int(table_row['runs']) == len(members)
    values = [float(r[key]) for r in members if r[key] not in ('', 'nan')]
    shown = table_row[header].split(' ')[0]
    if values:
      decimals = len(shown.partition('.')[2])
      assert float(shown) == pytest.approx(statistics.mean(values), abs=0.51 * 10**-decimals)
    else:
      assert shown == '—'
  with open(os.path.join(out, 'results.md')) as f:
    plots = [line[line.index('](') + 2:-2] for line in f if line.startswith('![')]
  assert plots and plot in plots
  for plot in plots:
    with open(os.path.join(out, plot), 'rb') as f:
      assert f.read(8) == b'\x89PNG\r\n\x1a\n'


def test_norm_placement_resumes_a_grid(tmp_path, corpus, capsys):
  out = tmp_path / 'out'
  run_script(norm_placement, out, corpus, '--placements=pre', '--norms=rmsnorm')
  (pre_dir,) = os.listdir(out / 'runs')
  pre_result = out / 'runs' / pre_dir / 'result.json'
  first_result = pre_result.read_text()
  capsys.readouterr()

  run_script(norm_placement, out, corpus, '--placements=pre,post', '--norms=rmsnorm')
  assert 'finished before' in capsys.readouterr().out
  assert pre_result.read_text() == first_result
  check_outputs(out, ['placement', 'norm'], 'validation loss', 'final_eval_loss', 2)
  record = json.loads(first_result)
  assert record['diverged'] in (True, False) and len(record['init_grad_per_layer']) == 1

  # An interrupted run (no result.json yet) resumes from its checkpoint instead of retraining.
  (post_dir,) = set(os.listdir(out / 'runs')) - {pre_dir}
  metrics_path = out / 'runs' / post_dir / 'metrics.jsonl'
  lines_before = metrics_path.read_text().splitlines()
  os.remove(out / 'runs' / post_dir / 'result.json')
  run_script(norm_placement, out, corpus, '--placements=pre,post', '--norms=rmsnorm')
  added = [json.loads(line) for line in metrics_path.read_text().splitlines()[len(lines_before):]]
  assert added and not any('loss' in line for line in added)  # evaluated again, not trained
  assert 'resumed from checkpoint 2' in capsys.readouterr().out
  assert (out / 'runs' / post_dir / 'result.json').exists()


def test_activations_two_seeds(tmp_path, corpus):
  run_script(activations, tmp_path, corpus, '--mlps=relu', '--seeds=2')
  check_outputs(tmp_path, ['mlp'], 'validation loss', 'final_eval_loss', 2)
  assert '±' in table(tmp_path)[0]['validation loss']


def test_moe(tmp_path, corpus):
  """A dense run and a DeepSeekMoE-like one with the dense run's active parameters: top-1 of
  16 experts of width F/2 plus a shared expert of F/2, and a router [D, 16] per layer."""
  run_script(moe, tmp_path, corpus, '--variants=dense,top1_shared')
  check_outputs(tmp_path, ['variant'], 'validation loss', 'final_eval_loss', 2, 'load.png')
  rows = {row['variant']: row for row in csv_rows(tmp_path)}
  d, f = 16, 43  # d_model and the gated width 8/3 d
  assert int(rows['dense']['active_params']) == int(rows['dense']['params'])
  assert int(rows['top1_shared']['active_params']) == (int(rows['dense']['params'])
                                                       - 3 * d * f + 3 * d * 2 * (f // 2) + d * 16)
  assert rows['dense']['load_entropy'] == ''
  assert 0 < float(rows['top1_shared']['load_entropy']) <= 1
  assert 1 / 16 <= float(rows['top1_shared']['busiest_share']) <= 1


def test_model_compression(tmp_path, corpus):
  """A float run with its PTQ and one-shot pruning rows, a recovered 2:4 run that starts from
  the float run pruned, and a distilled student that drafts for it."""
  run_script(model_compression, tmp_path, corpus, '--compressions=float,pruned2of4,student',
             '--steps=3', '--draft_tokens=2')
  rows = {row['setting']: row for row in table(tmp_path)}
  assert {'float', 'ptq int8', 'ptq int4', 'ptq int4:asym', 'prune 2:4 wanda, one-shot',
          'prune 2:4 magnitude + recovery', 'student d/2, distilled',
          'speculative: student drafts'} <= set(rows)
  assert float(rows['float']['change from float']) == 0
  assert int(rows['ptq int4']['state bytes']) < int(rows['ptq int8']['state bytes']) < int(
      rows['float']['state bytes'])
  assert 0 <= float(rows['speculative: student drafts']['drafts accepted']) <= 1
  records = [json.load(open(os.path.join(tmp_path, 'runs', name, 'result.json')))
             for name in os.listdir(os.path.join(tmp_path, 'runs'))]
  (recovered,) = [r for r in records if r['method'] == 'pruned2of4']
  (float_run,) = [r for r in records if r['method'] == 'float']
  # The recovery run starts from the float run pruned 2:4 by magnitude.
  assert recovered['initial_eval_loss'] == pytest.approx(
      float_run['prune 2:4 magnitude'], abs=1e-4)


def test_attention_types(tmp_path, corpus):
  run_script(attention_types, tmp_path, corpus, '--attention_variants=mla', '--head_dim=8',
             '--decode_batch=2')
  check_outputs(tmp_path, ['attention'], 'decode tokens/s', 'decode_tokens_per_s', 1)
  (row,) = csv_rows(tmp_path)
  assert int(row['kv_bytes_per_token']) == (4 * 8 + 8 // 2) * 4  # latent + RoPE key, float32
  mha = ModelConfig(vocab_size=320, d_model=16, n_layers=1, n_heads=2, n_kv_heads=2,
                    head_dim=8, ffn_dim=43, mlp='swiglu')
  assert abs(int(row['params']) - param_count(mha)) <= 3 * 16  # one FFN unit: 3 x d_model


def test_position_extrapolation(tmp_path, corpus):
  run_script(position_extrapolation, tmp_path, corpus, '--positions=learned,rope',
             '--eval_multiples=1,2', '--rope_scalings=yarn', '--finetune_scalings=pi',
             '--finetune_multiple=2', '--finetune_steps=1')
  check_outputs(tmp_path, ['position', 'rope scaling', 'fine-tuned'], 'ppl @ 32', 'ppl_x2', 4)
  rows = {(r['position'], r['rope scaling'], r['fine-tuned']): r for r in table(tmp_path)}
  assert rows[('learned', '—', 'no')]['ppl @ 32'] == '—'
  assert rows[('rope', 'yarn', 'no')]['ppl @ 32'] != '—'
  assert rows[('rope', 'pi', '1 steps at 32')]['ppl @ 16'] != '—'


def test_attention_scale(tmp_path, corpus):
  run_script(attention_scale, tmp_path, corpus, '--softmax_scales=none', '--head_dims=8')
  check_outputs(tmp_path, ['softmax_scale', 'head_dim'], 'entropy at init', 'init_entropy', 1)
  assert 0.0 < float(csv_rows(tmp_path)[0]['init_entropy']) <= 1.0


def test_finetuning(tmp_path, corpus):
  run_script(finetuning, tmp_path, corpus, '--methods=full,lora2,adapter3,prefix2',
             '--sft_steps=2', '--task_examples=40', '--seq_len=48')
  check_outputs(tmp_path, ['method'], 'task loss', 'final_eval_loss', 4)
  rows = {row['method']: row for row in csv_rows(tmp_path)}
  with open(tmp_path / 'base' / 'config.json') as f:
    base = ModelConfig(**json.load(f)['model'])
  d, f_dim = base.d_model, base.ffn_dim
  # Under each parameter-efficient method the rows of ChatML's two tokens (new to the byte
  # tokenizer) train too: in the embedding and in the untied head.
  token_rows = 2 * d * (1 if base.tie_embeddings else 2)
  # Rank 2 on q, k, v, o (d x d here) and gate, up, down: rank * (d_in + d_out) each.
  adapters = base.n_layers * 2 * (4 * (d + d) + 2 * (d + f_dim) + (f_dim + d))
  assert int(rows['lora2']['trainable_params']) == adapters + token_rows
  assert int(rows['full']['trainable_params']) == param_count(base)
  # Houlsby adapters of width 3 after both sublayers: down and up, each with a bias.
  assert int(rows['adapter3']['trainable_params']) == (base.n_layers * 2 * (2 * 3 * d + 3 + d)
                                                       + token_rows)
  # Two keys and two values in every layer, each n_kv_heads * head_dim wide.
  kv_width = base.n_kv_heads * base.resolved_head_dim
  assert int(rows['prefix2']['trainable_params']) == (base.n_layers * 2 * 2 * kv_width
                                                      + token_rows)
  # Every method but prefix tuning (whose prefix every token sees) starts out computing the
  # base model: the same source loss before fine-tuning.
  before = [float(row['source_loss']) - float(row['forgetting']) for method, row in rows.items()
            if method != 'prefix2']
  assert max(before) - min(before) < 1e-5 and before[0] > 0


def test_initialisation(tmp_path, corpus):
  run_script(initialisation, tmp_path, corpus, '--qkv_inits=zero,one')
  check_outputs(tmp_path, ['qkv_init'], 'validation loss', 'final_eval_loss', 2)
  rows = {r['qkv_init']: r for r in csv_rows(tmp_path)}
  assert float(rows['zero']['init_qk_grad']) == 0.0
  assert float(rows['zero']['init_entropy']) == pytest.approx(1.0)
  assert float(rows['one']['init_head_similarity']) == pytest.approx(1.0)


@pytest.mark.parametrize('args, message', [
    (['--placements=sideways'], '--placements: \'sideways\' is not one of'),
    (['--learning_rate=fast'], '--learning_rate: \'fast\' is not a number'),
    (['--seeds=0'], '--seeds=0 must be positive'),
])
def test_bad_flags_are_one_line(tmp_path, corpus, capsys, args, message):
  with pytest.raises(SystemExit) as exit_info:
    run_script(norm_placement, tmp_path, corpus, *args)
  assert exit_info.value.code == 1
  err = capsys.readouterr().err.strip().splitlines()
  assert len(err) == 1 and err[0].startswith('error: ') and message in err[0]
  assert not os.path.exists(tmp_path / 'runs')


def test_alignment(tmp_path, corpus):
  # --eval_every=2: the held-out evaluation at step 0 and at the end only.
  run_script(alignment, tmp_path, corpus, '--algorithms=sft,grpo,rpo', '--warm_start_steps=2',
             '--seq_len=32', '--batch_size=20', '--samples_per_prompt=4', '--eval_every=2')
  check_outputs(tmp_path, ['method'], 'held-out accuracy', 'accuracy', 3, 'accuracy_kl.png')
  rows = {row['method']: row for row in csv_rows(tmp_path)}
  assert float(rows['sft']['kl']) == 0.0
  assert all(0.0 <= float(row['accuracy']) <= 1.0 for row in rows.values())
  # The DPO family's pairs: each rejects a sample that is not the sum and chooses the sum.
  with open(tmp_path / 'sampled_pairs.jsonl') as f:
    pairs = [json.loads(line) for line in f]
  assert len(pairs) > 100
  held_out = {f'{a}+{b}=' for a, b in arithmetic.problems()[-500:]}
  for pair in pairs:
    a, b = map(int, pair['prompt'].rstrip('=').split('+'))
    assert pair['chosen'] == str(a + b) and pair['rejected'].strip() != str(a + b)
    assert pair['rejected'].strip() and pair['prompt'] not in held_out


def test_repetition(tmp_path, corpus):
  run_script(repetition, tmp_path, corpus, '--warm_start_steps=2', '--seq_len=64',
             '--batch_size=8', '--samples_per_prompt=4', '--reply_tokens=8',
             '--repetition_penalties=1.5', '--eval_every=2')
  check_outputs(tmp_path, ['method'], 'distinct-2', 'distinct_2', 4, 'distinct.png')
  rows = {row['method']: row for row in csv_rows(tmp_path)}
  assert set(rows) == {'data', 'sft', 'penalty 1.5', 'grpo'}
  assert all(0.0 <= float(row[key]) <= 1.0 for row in rows.values()
             for key in ('distinct_1', 'distinct_2'))
  with open(tmp_path / 'continuations.jsonl') as f:
    examples = [json.loads(line) for line in f]
  assert len(examples) == repetition.EXAMPLES
  assert all(len(e['prompt']) in range(24, 28) and e['completion'].count('\n') == 1
             for e in examples)
