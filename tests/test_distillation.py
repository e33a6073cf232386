"""Distillation (training/distillation.py): the soft loss against PyTorch's KL divergence, and
main.py end to end: a student that starts as its teacher has no soft loss to learn, a smaller
student's soft loss falls, and a teacher of another tokenizer is refused."""
import json
import os

import jax.numpy as jnp
import numpy as np
import pytest
import torch

from lmlab.training.distillation import soft_loss
from test_main import SMALL, run_mains


def test_soft_loss_is_torchs_kl_divergence(rng):
  temperature = float(rng.uniform(0.5, 4))
  student, teacher = (rng.standard_normal((2, 5, 11)).astype(np.float32) * 3 for _ in range(2))
  torch_log = lambda x: torch.log_softmax(torch.from_numpy(x).reshape(-1, 11) / temperature, -1)
  expected = torch.nn.functional.kl_div(torch_log(student), torch_log(teacher), log_target=True,
                                        reduction='batchmean') * temperature ** 2
  np.testing.assert_allclose(soft_loss(jnp.asarray(student), jnp.asarray(teacher), temperature),
                             expected.item(), rtol=1e-5)


def metrics(workdir):
  with open(os.path.join(workdir, 'metrics.jsonl')) as f:
    return [json.loads(line) for line in f if 'soft_loss' in line]


def test_main_distill(tmp_path, corpus_dir):
  teacher, other = str(tmp_path / 'teacher'), str(tmp_path / 'other')
  common = [*SMALL, f'--data={corpus_dir}', '--learning_rate=1e-2', '--log_every=1']
  run_mains([*common, f'--workdir={teacher}', '--steps=30'],
            [*common, f'--workdir={other}', '--tokenizer=bpe:280', '--steps=2'])
  distill = [*common, '--objective=distill', f'--teacher={teacher}', '--distill_weight=1']
  itself, student, wrong_tokenizer, no_teacher = run_mains(
      [*distill, f'--init_from={teacher}', f'--workdir={tmp_path / "copy"}', '--steps=1',
       '--learning_rate=0'],
      [*distill, f'--workdir={tmp_path / "student"}', '--steps=30', '--set', 'd_model=16',
       '--set', 'ffn_dim=32'],
      [*distill[:-2], f'--teacher={other}', f'--workdir={tmp_path / "w"}', '--steps=1'],
      [*common, '--objective=distill', f'--workdir={tmp_path / "n"}', '--steps=1'], check=False)
  assert itself.returncode == 0 and student.returncode == 0, student.stderr[-2000:]
  assert metrics(str(tmp_path / 'copy'))[0]['soft_loss'] == pytest.approx(0, abs=1e-6)
  soft = [m['soft_loss'] for m in metrics(str(tmp_path / 'student'))]
  assert np.mean(soft[-5:]) < 0.7 * np.mean(soft[:5])
  assert wrong_tokenizer.returncode == 1
  assert 'another tokenizer or vocabulary' in wrong_tokenizer.stderr
  assert no_teacher.returncode == 1 and 'needs --teacher' in no_teacher.stderr
