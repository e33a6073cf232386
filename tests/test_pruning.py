"""Pruning (models/pruning.py): masks against the definitions of unstructured and n:m sparsity,
Wanda's input norms against the layer inputs computed by hand, and main.py end to end: a
pruned workdir evaluates with its zeros, a recovery fine-tune keeps them zero, and its
Hugging Face export gives transformers' model our logits."""
import os

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from conftest import small_config
from lmlab.models import pruning, registry
from lmlab.models.errors import ConfigError
from lmlab.training.restored import restore
from test_hf import hf_logits
from test_main import SMALL, run_main, run_mains


@pytest.mark.parametrize('spec', ['unstructured:0.5', 'unstructured:0.3', '2:4', '1:4', '4:8'])
def test_masks_follow_the_definitions(spec, rng):
  parsed = pruning.parse_spec(spec)
  d_in, d_out = 32, int(rng.integers(2, 7))
  score = rng.random((d_in, d_out)).astype(np.float32)  # continuous: no ties
  keep = np.asarray(pruning.keep_mask(jnp.asarray(score), parsed))
  assert keep.dtype == bool
  groups = [(slice(None), j) for j in range(d_out)] if not parsed.n else [
      (slice(g, g + parsed.m), j) for g in range(0, d_in, parsed.m) for j in range(d_out)]
  for rows, j in groups:
    kept, pruned = score[rows, j][keep[rows, j]], score[rows, j][~keep[rows, j]]
    size = len(score[rows, j])
    wanted_kept = parsed.n if parsed.n else size - round(parsed.sparsity * size)
    assert len(kept) == wanted_kept
    assert len(pruned) == 0 or kept.min() > pruned.max()


def test_wanda_norms_are_the_layer_inputs_norms(rng):
  config = small_config()
  model = registry.build(config, rngs=nnx.Rngs(int(rng.integers(1 << 30))))
  batches = [{'inputs': jnp.asarray(rng.integers(0, 61, (2, 9)), jnp.int32)} for _ in range(3)]
  norms = pruning.input_norms(model, lambda m, batch: m(batch['inputs']), batches)
  block = model.blocks[0]
  inputs = jnp.concatenate([block.attn_in_norm(model.embed(b['inputs'])).reshape(-1, 32)
                            for b in batches])
  np.testing.assert_allclose(norms[('blocks', 0, 'attention', 'q_proj', 'input_squares')],
                             np.sqrt(np.sum(np.square(np.asarray(inputs)), axis=0)), rtol=1e-5)
  assert len(norms) == len(pruning.pruned_layers(model))
  # Wanda's score prunes where |W| * ||X|| is smallest: within each output channel of q_proj.
  sparsity = pruning.prune(model, pruning.parse_spec('unstructured:0.5'), norms)
  assert sparsity == pytest.approx(0.5)
  kernel = np.asarray(block.attention.q_proj.kernel[...])
  assert np.all((kernel == 0).sum(axis=0) == 16)


def test_bad_specs():
  for spec in ['unstructured:1', 'unstructured:-0.1', 'unstructured:x', '4:2', '0:4', '2-4']:
    with pytest.raises(ConfigError, match='--prune='):
      pruning.parse_spec(spec)
  model = registry.build(small_config(ffn_dim=36), rngs=nnx.Rngs(0))
  with pytest.raises(ConfigError, match='8 does not divide the input dimension 36'):
    pruning.prune(model, pruning.parse_spec('2:8'))


def test_main_prune_recover_and_export(tmp_path, corpus_dir, rng):
  run, pruned, recovered = (str(tmp_path / name) for name in ('run', 'pruned', 'recovered'))
  common = [*SMALL, f'--data={corpus_dir}', '--learning_rate=1e-2']
  run_main(*common, f'--workdir={run}', '--steps=20')
  wanda, bad_score = run_mains(
      ['--mode=prune', f'--workdir={run}', '--prune=2:4', '--prune_score=wanda',
       '--calibration_batches=2', f'--pruned_workdir={pruned}'],
      ['--mode=prune', f'--workdir={run}', '--prune=unstructured:1.5',
       f'--pruned_workdir={tmp_path / "x"}'], check=False)
  assert wanda.returncode == 0, wanda.stderr[-2000:]
  assert '50.0% of the blocks\' dense weights are zero' in wanda.stdout
  assert bad_score.returncode == 1 and 'sparsity must be a number in [0, 1)' in bad_score.stderr
  assert not os.path.exists(tmp_path / 'x')
  before = {p: np.asarray(v.get_value()) for p, v in nnx.to_flat_state(restore(pruned).params)}
  evaluated, _ = run_mains(['--mode=eval', f'--workdir={pruned}'],
                           [*common, f'--init_from={pruned}', f'--workdir={recovered}',
                            '--steps=5'])
  assert 'loss' in evaluated.stdout
  after = {p: np.asarray(v.get_value()) for p, v in nnx.to_flat_state(restore(recovered).params)}
  masks = [p for p in before if p[-1] == 'mask']
  assert masks
  for mask_path in masks:
    kernel_path = (*mask_path[:-1], 'kernel')
    mask = before[mask_path]
    np.testing.assert_array_equal(after[mask_path], mask)
    assert np.all(before[kernel_path][~mask] == 0) and np.all(after[kernel_path][~mask] == 0)
    assert not np.array_equal(after[kernel_path][mask], before[kernel_path][mask])
    # 2:4 along the input axis of every output channel.
    assert np.all(mask.reshape(-1, 4, mask.shape[1]).sum(axis=1) == 2)

  # Exported to Hugging Face as a plain model with the zeros: transformers computes its logits.
  transformers = pytest.importorskip('transformers')
  exported = str(tmp_path / 'exported')
  run_main('--mode=convert', f'--workdir={recovered}', f'--hf_out={exported}')
  reloaded = transformers.AutoModelForCausalLM.from_pretrained(exported).eval()
  loaded = restore(recovered)
  ids = rng.integers(0, loaded.tokenizer.n_vocab, (2, 12))
  np.testing.assert_allclose(hf_logits(reloaded, ids),
                             nnx.merge(loaded.graphdef, loaded.params)(jnp.asarray(ids)),
                             atol=2e-5, rtol=1e-5)
