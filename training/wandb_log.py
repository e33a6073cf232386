"""Weights & Biases logging (--wandb=online or offline): the scalars that go to metrics.jsonl
and TensorBoard, also sent to one W&B run per workdir.

The run's id is kept in the workdir's wandb_id, so a resumed training run logs to the same
W&B run. Offline runs are written under <workdir>/wandb/ and uploaded later with
`wandb sync`; a resumed offline run is a second folder with the same id, and W&B documents
syncing such folders one after another as unreliable (sync the sessions of a resumed run
with care, or train it online). The x axis is the metric `step`, not W&B's own
counter: a run resumed from a checkpoint older than its last logged step logs those steps
again, which W&B's counter would refuse.
"""
import importlib.util
import json
import os

from lmlab.training import workdir as workdir_lib
from lmlab.training.trainer import TrainingError

MODES = ('online', 'offline')
ID_FILE = 'wandb_id'


def missing_package() -> bool:
  return importlib.util.find_spec('wandb') is None


class WandbLog:
  """Has the interface of tensorboard.EventsWriter: scalars(step, values) and close()."""

  def __init__(self, workdir: str, mode: str, project: str, config: dict):
    import wandb
    id_path = os.path.join(workdir, ID_FILE)
    run_id = None
    if os.path.exists(id_path):
      with open(id_path) as f:
        run_id = f.read().strip() or None
    try:
      # console='off': W&B would otherwise wrap sys.stdout, under the live progress line.
      self._run = wandb.init(project=project, dir=workdir, mode=mode, id=run_id,
                             resume='allow', name=os.path.basename(os.path.normpath(workdir)),
                             config=config,
                             settings=wandb.Settings(console='off', save_code=False))
    except wandb.Error as error:  # No API key online, no connection, ...
      raise TrainingError(f'--wandb={mode}: W&B could not start a run ({error}); '
                          '--wandb=offline needs no account') from None
    if run_id is None:
      with open(id_path, 'w') as f:
        f.write(self._run.id + '\n')
    self._run.define_metric('*', step_metric='step')

  def scalars(self, step: int, values: dict[str, float]):
    self._run.log({'step': step, **values})

  def close(self):
    self._run.finish()


def config_of(workdir: str) -> dict:
  """The run's config.json, W&B's config of the run (its searchable hyperparameters)."""
  with open(workdir_lib.config_path(workdir), encoding='utf-8') as f:
    return json.load(f)
