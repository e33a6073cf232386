"""What a training objective supplies to training.loop.train; the base of every objective.

An objective is made as objective(train_config, model_config, log=print) and provides:
  model_config, tokenizer   the model config resolved against the data (vocab_size 0, a
                            classifier's labels, ...) and the run's tokenizer
  load_data()               called once the run's config is recorded (tokenising, checks)
  train_batch(step)         numpy arrays [batch_size, ...], a pure function of (seed, step);
                            an `online` objective's is train_batch(step, params), sampled
                            from the model whose parameters the step starts from (a pure
                            function of (seed, step, params))
  loss                      loss(model, batch, dropout_key, frozen) -> (loss, metrics with
                            'loss'), or None for the next-token loss of training/steps.py
  evaluate(graphdef, params) -> {'eval_loss': ..., and other eval_* metrics}
  trainable                 an nnx filter of the parameters the optimizer updates; None: all;
                            default: the model's PEFT method's (models/registry.trainable)
  frozen(params)            state the loss reads but does not train (a reference or teacher
                            model's parameters), made from the run's initial parameters, or
                            None; it is placed like the parameters and passed to every step
  prepare                   prepare(model, micro_batch, frozen) -> micro_batch, or None: what
                            the loss needs from the parameters a step starts with, computed
                            once before its updates (training/steps.py make_train_step)
  put_batch(numpy batch)    places a batch on the devices; train() sets it to the run's
                            (training.parallel.Layout.put_batch)

To add one: a class in a file of its own (or beside its kin in training/objectives.py), a line
in training/objectives.py:OBJECTIVES naming it for --objective, and its test.
"""
from lmlab.models import registry


class Objective:
  """Defaults for the optional parts: the next-token loss, the parameters the model config
  trains (all of them, or a PEFT method's), nothing frozen."""
  loss = None
  put_batch = None
  online = False
  prepare = None

  @property
  def trainable(self):
    return registry.trainable(self.model_config)

  def frozen(self, params):
    del params
    return None
