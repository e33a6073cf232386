"""DeepseekV2ForCausalLM beyond the parity cases of tests/test_hf.py: the refusal of
mixture-of-experts layers, and null experts read as dense layers."""
import jax.numpy as jnp
import numpy as np
import pytest

from lmlab.models.errors import CheckpointError
from lmlab.models import hf
from test_hf import hf_logits, hf_model, saved_with_config_editor

pytest.importorskip('torch')
pytest.importorskip('transformers')


def test_mixture_of_experts_layers_are_refused_and_no_experts_is_dense(rng, tmp_path):
  model = hf_model('DeepseekV2', {}, int(rng.integers(1 << 30)))
  path, write_config = saved_with_config_editor(model, tmp_path / 'hf')

  write_config(first_k_dense_replace=1, n_routed_experts=8)
  with pytest.raises(CheckpointError, match='first_k_dense_replace=1 .*mixture-of-experts'):
    hf.load(path)
  write_config(num_key_value_heads=2)
  with pytest.raises(CheckpointError, match='num_key_value_heads'):
    hf.load(path)
  # DeepSeek's own modelling code makes every layer dense when n_routed_experts is null.
  write_config(first_k_dense_replace=0, n_routed_experts=None)
  ids = rng.integers(0, 97, (1, 9))
  np.testing.assert_allclose(np.asarray(hf.load(path)(jnp.asarray(ids))), hf_logits(model, ids),
                             atol=1e-4, rtol=0)
