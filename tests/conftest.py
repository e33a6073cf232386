"""Shared helpers: small configs and per-run random seeds."""
import dataclasses
import os
import sys

import numpy as np
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from models.config import ModelConfig  # noqa: E402


def small_config(**fields) -> ModelConfig:
  base = ModelConfig(vocab_size=61, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2,
                     ffn_dim=48, max_seq_len=64)
  return dataclasses.replace(base, **fields).validate()


@pytest.fixture
def rng(request):
  """A numpy Generator seeded fresh per test run (the seed is printed on failure)."""
  seed = int.from_bytes(os.urandom(4), 'little')
  print(f'random seed for {request.node.name}: {seed}')
  return np.random.default_rng(seed)
