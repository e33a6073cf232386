"""Orbax checkpoints of a run: parameters, optimizer state and a JSON record.

The record holds the step, the seed, the data cursor, the resolved config and the
tokenizer reference, so a checkpoint says by itself how to continue it. A checkpoint
converted from another format holds parameters only and says so (`params_only` in its
record); a run continuing it starts a fresh optimizer state.
"""
import os

import jax
import orbax.checkpoint as ocp

from lmlab.models.errors import CheckpointError


def _on_first_device(abstract_state):
  device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
  return jax.tree.map(lambda leaf: jax.ShapeDtypeStruct(leaf.shape, leaf.dtype, sharding=device),
                      abstract_state)


class Checkpoints:

  def __init__(self, workdir: str, *, keep: int = 3):
    self.directory = os.path.join(os.path.abspath(workdir), 'checkpoints')
    self.manager = ocp.CheckpointManager(
        self.directory,
        options=ocp.CheckpointManagerOptions(max_to_keep=keep, create=True,
                                             enable_async_checkpointing=False),
        item_names=('state', 'record'))

  def latest_step(self):
    return self.manager.latest_step()

  def save(self, step: int, state, record: dict):
    if step in self.manager.all_steps():
      return
    self.manager.save(step, args=ocp.args.Composite(state=ocp.args.StandardSave(state),
                                                     record=ocp.args.JsonSave(record)))

  def read_record(self, step: int) -> dict:
    try:
      return self.manager.restore(step, args=ocp.args.Composite(
          record=ocp.args.JsonRestore()))['record']
    except Exception as e:  # Orbax raises many kinds; all mean the same to the user.
      raise self._unreadable(step, e) from e

  def restore(self, step: int, abstract_params, init_opt_state, *, place=None):
    """(params, optimizer state or None, record) of `step`, shaped like abstract_params.

    init_opt_state(params) gives the optimizer state's shapes, and is skipped (None is
    returned) for a parameters-only checkpoint. place(abstract state) adds the shardings to
    restore onto (training.parallel.Layout.abstract), whatever mesh the checkpoint was saved
    from; by default every array goes whole to this process's first device.
    """
    record = self.read_record(step)
    place = place or _on_first_device
    if record.get('params_only'):
      return self.restore_state(step, place({'params': abstract_params}))['params'], None, record
    state = self.restore_state(step, place({
        'params': abstract_params, 'opt_state': jax.eval_shape(init_opt_state, abstract_params)}))
    return state['params'], state['opt_state'], record

  def restore_state(self, step: int, abstract_state):
    """The saved state, shaped and typed like `abstract_state` (from jax.eval_shape)."""
    try:
      restored = self.manager.restore(step, args=ocp.args.Composite(
          state=ocp.args.StandardRestore(abstract_state)))['state']
    except Exception as e:
      raise self._unreadable(step, e) from e
    saved = jax.tree.map(lambda x: (x.shape, x.dtype), restored)
    wanted = jax.tree.map(lambda x: (x.shape, x.dtype), abstract_state)
    if saved != wanted:
      raise CheckpointError(f'checkpoint {step} in {self.directory} does not match the model '
                            'config; use the config it was made with or a new --workdir')
    return restored

  def _unreadable(self, step, error):
    reason = str(error).splitlines()[0][:200] if str(error) else type(error).__name__
    return CheckpointError(f'checkpoint {step} in {self.directory} cannot be read ({reason}); '
                           'move that step folder away to resume from an earlier one, or '
                           'use a new --workdir')

  def close(self):
    self.manager.wait_until_finished()
    self.manager.close()
