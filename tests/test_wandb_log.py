"""--wandb's refusals, before anything is written (its logging: test_main.py's
test_sigterm_saves_and_the_run_resumes, read back from W&B's own record files)."""
import importlib.util

import pytest

from lmlab.models.errors import ConfigError
from lmlab.training.config import TrainConfig


def test_unknown_mode_is_refused(tmp_path):
  with pytest.raises(ConfigError, match=r"--wandb='cloud' is not one of online, offline"):
    TrainConfig(workdir=str(tmp_path), wandb='cloud').validate()
  assert not any(tmp_path.iterdir())


def test_missing_package_is_refused(tmp_path, monkeypatch):
  real = importlib.util.find_spec
  monkeypatch.setattr(importlib.util, 'find_spec',
                      lambda name, *args: None if name == 'wandb' else real(name, *args))
  with pytest.raises(ConfigError, match='--wandb needs the wandb package: pip install wandb'):
    TrainConfig(workdir=str(tmp_path), wandb='offline').validate()
  TrainConfig(workdir=str(tmp_path)).validate()
