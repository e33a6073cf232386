"""Knowledge distillation (Hinton et al. 2015; objective 'distill'): a student learns the
next-token distribution of a frozen teacher with the same tokenizer, softened by a
temperature T, mixed with the hard next-token loss:

  loss = w * T^2 * KL(softmax(teacher / T) || softmax(student / T)) + (1 - w) * CE(student)

(w: --distill_weight; T^2 keeps the soft term's gradients on the scale of the hard one's as T
grows). The teacher's logits are computed inside each step from its parameters, which the
step reads as frozen state and never trains.

  python main.py --objective=distill --teacher=runs/tiny --set d_model=64 \
      --workdir=runs/tiny-student
"""
import os

import jax
import jax.numpy as jnp
from flax import nnx

from lmlab.data import tokenizer as tokenizer_lib
from lmlab.models import hf
from lmlab.models.errors import ConfigError
from lmlab.training import steps as steps_lib
from lmlab.training.language_modeling import LanguageModeling, check_same_vocabulary
from lmlab.training.restored import restore
from lmlab.training.workdir import config_path


def soft_loss(student_btv, teacher_btv, temperature: float):
  """Mean over tokens of T^2 KL(softmax(teacher / T) || softmax(student / T)), in float32."""
  student_logp = jax.nn.log_softmax(student_btv.astype(jnp.float32) / temperature, axis=-1)
  teacher_logp = jax.nn.log_softmax(teacher_btv.astype(jnp.float32) / temperature, axis=-1)
  kl_bt = jnp.sum(jnp.exp(teacher_logp) * (teacher_logp - student_logp), axis=-1)
  return temperature ** 2 * jnp.mean(kl_bt)


def load_teacher(path: str):
  """(graphdef, params, tokenizer) of a training run's latest checkpoint or of a Hugging Face
  folder (its tokenizer.json)."""
  if os.path.exists(os.path.join(path, 'checkpoints')) and os.path.exists(config_path(path)):
    loaded = restore(path)
    return loaded.graphdef, loaded.params, loaded.tokenizer
  if not os.path.exists(os.path.join(path, 'config.json')):
    raise ConfigError(f'--teacher={path} is neither a training run\'s workdir nor a Hugging Face '
                      'folder (config.json, *.safetensors)')
  tokenizer_file = os.path.join(path, 'tokenizer.json')
  if not os.path.exists(tokenizer_file):
    raise ConfigError(f'--teacher={path} has no tokenizer.json to compare with the student\'s')
  graphdef, params = nnx.split(hf.load(path))
  return graphdef, params, tokenizer_lib.load_tokenizer(tokenizer_file)


class Distillation(LanguageModeling):
  """The next-token data of objective 'lm', with the teacher's distribution as the target."""

  def __init__(self, train_config, model_config, *, log=print):
    super().__init__(train_config, model_config, log=log)
    self.teacher_graphdef, self._teacher_params, tokenizer = load_teacher(train_config.teacher)
    teacher_config = nnx.merge(self.teacher_graphdef, self._teacher_params).config
    check_same_vocabulary(self.model_config, teacher_config, self.tokenizer, tokenizer,
                          f'--teacher={train_config.teacher}')

  def frozen(self, params):
    del params
    return self._teacher_params

  def loss(self, model, batch, dropout_key, frozen=None):
    if frozen is None:
      raise ConfigError('the distillation loss reads the teacher, which only the training run '
                        'holds; evaluate the student with --mode=eval')
    student_btv = steps_lib.model_logits(model, batch, dropout_key)
    teacher_btv = jax.lax.stop_gradient(steps_lib.model_logits(
        nnx.merge(self.teacher_graphdef, frozen), batch))
    hard = steps_lib.cross_entropy(student_btv, batch['targets'])
    soft = soft_loss(student_btv, teacher_btv, self.config.distill_temperature)
    weight = self.config.distill_weight
    return weight * soft + (1 - weight) * hard, {'loss': hard, 'soft_loss': soft}
