"""A training run's latest parameters, read back: what evaluation, sampling, conversion and
the runs that start from or score with another run (--init_from, a reward model) load."""
import dataclasses

from flax import nnx

from lmlab.data.tokenizer import separator_id
from lmlab.models.errors import CheckpointError
from lmlab.models.registry import abstract_model, trainable
from lmlab.training import steps as steps_lib
from lmlab.training.checkpoint import Checkpoints
from lmlab.training.config import TrainConfig
from lmlab.training.language_modeling import load_run_tokenizer
from lmlab.training.optimizer import OptimizerConfig, make_optimizer
from lmlab.training.workdir import read_config


@dataclasses.dataclass(frozen=True)
class Loaded:
  """A model to evaluate or sample from, with the run config that describes its data."""
  graphdef: object
  params: object
  tokenizer: object
  run: TrainConfig
  source: str            # 'checkpoint <step>' or the Hugging Face folder.
  step: int | None = None
  end_token: int | None = None  # Ends a sample; None: the tokenizer's end-of-text.

  @property
  def sample_end(self) -> int:
    """The token that ends a sample."""
    return separator_id(self.tokenizer) if self.end_token is None else self.end_token


def restore(workdir: str) -> Loaded:
  """The latest checkpoint of a training run's workdir, read without writing there (a run
  may be using it)."""
  resolved = read_config(workdir)
  fields = {f.name for f in dataclasses.fields(TrainConfig)}
  run = TrainConfig(**{k: v for k, v in resolved.items() if k in fields})
  graphdef, abstract_params = nnx.split(abstract_model(resolved['model']))
  checkpoints = Checkpoints(workdir, read_only=True)
  try:
    step = checkpoints.latest_step()
    if step is None:
      raise CheckpointError(f'no checkpoint in {checkpoints.directory}; train first')
    optimizer = make_optimizer(OptimizerConfig(**resolved['optimizer']).resolved(
        run.steps, resolved['model'].family))
    params, _, _ = checkpoints.restore(
        step, abstract_params, lambda params: optimizer.init(steps_lib.trainable_part(
            params, trainable(resolved['model']))))
  finally:
    checkpoints.close()
  return Loaded(graphdef, params, load_run_tokenizer(run), run, f'checkpoint {step}', step)
