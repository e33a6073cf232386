"""The memory estimator (training/memory.py) against XLA's memory_analysis() of the compiled
train step (shapes only: nothing is allocated), on random small decoders; its sharding
arithmetic against the definitions; and main.py --mode=memory."""
import dataclasses

import jax
import jax.numpy as jnp
import pytest
from flax import nnx

from lmlab.models.config import ModelConfig
from lmlab.models.errors import ConfigError
from lmlab.models.registry import abstract_model, param_count, trainable
from lmlab.training import memory
from lmlab.training.optimizer import OptimizerConfig, make_optimizer, schedule
from lmlab.training.steps import make_train_step, trainable_part
from test_main import run_main


def compiled_bytes(config, batch_size, seq_len) -> int:
  """Bytes the compiled train step holds at once: its arguments (parameters, optimizer state,
  batch), its temporaries, and its outputs less those written over donated arguments."""
  graphdef, params = nnx.split(abstract_model(config))
  opt_config = OptimizerConfig().resolved(steps=100, family='decoder')
  optimizer = make_optimizer(opt_config)
  opt_state = jax.eval_shape(
      lambda p: optimizer.init(trainable_part(p, trainable(config))), params)
  step = make_train_step(graphdef, optimizer, schedule(opt_config), seed=0, use_dropout=False,
                         trainable=trainable(config))
  tokens = jax.ShapeDtypeStruct((1, batch_size, seq_len), jnp.int32)
  batch = {'inputs': tokens, 'targets': tokens}
  return memory.compiled_bytes(step.lower(params, opt_state, batch, jnp.int32(0)).compile())


def random_config(rng) -> ModelConfig:
  d = int(rng.choice([32, 64, 96, 128]))
  n_heads = int(rng.choice([2, 4]))
  return ModelConfig(vocab_size=int(rng.choice([256, 512, 1024])), d_model=d,
                     n_layers=int(rng.integers(1, 4)), n_heads=n_heads,
                     n_kv_heads=int(rng.choice([1, n_heads])),
                     ffn_dim=int(rng.choice([2, 3, 4])) * d, max_seq_len=256,
                     mlp=str(rng.choice(['swiglu', 'gelu', 'relu'])),
                     tie_embeddings=bool(rng.integers(2))).validate()


@pytest.mark.parametrize('regime', ['activations', 'parameters'])
def test_estimate_matches_the_compiled_step(regime, rng):
  """Within 15%, with many tokens (activations dominate) and few (gradients dominate)."""
  for _ in range(3):
    config = random_config(rng)
    batch_size, seq_len = ((int(rng.choice([4, 8])), int(rng.choice([64, 128])))
                           if regime == 'activations' else (1, int(rng.choice([8, 16]))))
    estimate = memory.estimate(config, batch_size=batch_size, seq_len=seq_len, mesh='data:1',
                               n_devices=1)
    assert estimate['total'] == pytest.approx(compiled_bytes(config, batch_size, seq_len),
                                              rel=0.15), (config, batch_size, seq_len)


def test_sharding_and_parts(rng):
  config = dataclasses.replace(random_config(rng), dtype='bfloat16', param_dtype='bfloat16')
  one = memory.estimate(config, batch_size=8, seq_len=64, mesh='data:1', n_devices=1)
  fsdp = memory.estimate(config, batch_size=8, seq_len=64, mesh='fsdp:4', n_devices=4)
  data = memory.estimate(config, batch_size=8, seq_len=64, mesh='data:4', n_devices=4)
  assert one['parameters'] == param_count(config) * 2
  assert one['optimizer'] == one['gradients'] == 2 * one['parameters']
  for name in ('parameters', 'optimizer', 'gradients', 'activations'):
    assert fsdp[name] == pytest.approx(one[name] / 4)
  assert data['parameters'] == one['parameters']
  assert data['activations'] == pytest.approx(one['activations'] / 4)
  assert one['total'] == one['parameters'] + one['optimizer'] + max(one['activations'],
                                                                      one['gradients'])
  inference = memory.estimate(config, batch_size=2, seq_len=64, mesh='data:1', n_devices=1,
                              use='inference')
  head_dim = config.d_model // config.n_heads
  assert inference['kv_cache'] == 2 * config.n_layers * config.n_kv_heads * head_dim * 128 * 2
  with pytest.raises(ConfigError, match='does not split over the 4 devices'):
    memory.estimate(config, batch_size=2, seq_len=64, mesh='data:4', n_devices=4)
  with pytest.raises(ConfigError, match='moe_experts=4 is not covered'):
    memory.estimate(dataclasses.replace(config, moe_experts=4, moe_top_k=1), batch_size=2,
                    seq_len=64, mesh='data:1', n_devices=1)


def test_main_memory():
  out = run_main('--mode=memory', '--model=llama2-7b', '--mesh=fsdp:8', '--batch_size=8',
                 '--seq_len=4096', '--set', 'dtype=bfloat16', '--set',
                 'param_dtype=bfloat16').stdout
  row = out.strip().splitlines()[-1].split('|')
  # Llama 2 7B has 6,738,415,616 parameters (Touvron et al. 2023's checkpoint): bf16, split 8 ways.
  assert float(row[2]) == pytest.approx(6_738_415_616 * 2 / 8 / 2**30, abs=0.005)
