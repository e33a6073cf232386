"""DeepseekV2ForCausalLM beyond the parity cases of tests/test_hf.py: the refusal of routing
we do not implement, and null experts read as dense layers."""
import jax.numpy as jnp
import numpy as np
import pytest

from lmlab.models.errors import CheckpointError, ConfigError
from lmlab.models import hf
from test_hf import hf_logits, hf_model, saved_with_config_editor

pytest.importorskip('torch')
pytest.importorskip('transformers')


def test_routing_we_do_not_implement_is_refused(rng, tmp_path):
  model = hf_model('DeepseekV2', dict(first_k_dense_replace=1, n_routed_experts=4,
                                      num_experts_per_tok=2, moe_intermediate_size=8),
                   int(rng.integers(1 << 30)))
  path, write_config = saved_with_config_editor(model, tmp_path / 'hf')
  for field, value in (('topk_method', 'noaux_tc'), ('scoring_func', 'sigmoid'),
                       ('norm_topk_prob', True), ('moe_layer_freq', 2)):
    write_config(**{field: value})
    with pytest.raises(CheckpointError, match=f'config.json {field}='):
      hf.load(path)
  write_config(num_experts_per_tok=5)
  with pytest.raises(ConfigError, match='moe_top_k=5'):
    hf.load(path)


def test_null_experts_are_dense_layers(rng, tmp_path):
  """DeepSeek's own modelling code makes every layer dense when n_routed_experts is null."""
  model = hf_model('DeepseekV2', {}, int(rng.integers(1 << 30)))
  path, write_config = saved_with_config_editor(model, tmp_path / 'hf')
  write_config(num_key_value_heads=2)
  with pytest.raises(CheckpointError, match='num_key_value_heads'):
    hf.load(path)
  write_config(first_k_dense_replace=0, n_routed_experts=None)
  ids = rng.integers(0, 97, (1, 9))
  np.testing.assert_allclose(np.asarray(hf.load(path)(jnp.asarray(ids))), hf_logits(model, ids),
                             atol=1e-4, rtol=0)
