"""training/tensorboard.py's events files, read back by TensorBoard's own reader; CRC-32C
against its published check value."""
import numpy as np
import pytest

from lmlab.training.tensorboard import EventsWriter, crc32c


def test_crc32c_check_value():
  # The standard check value of CRC-32C: the checksum of the nine ASCII digits.
  assert crc32c(b'123456789') == 0xE3069283


def test_tensorboard_reads_what_was_written(tmp_path, rng):
  from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
  tags = ['train/loss', 'eval/bpb/bits_per_byte', 'eval/mc_λ/acc']
  written = {tag: {} for tag in tags}
  writer = EventsWriter(str(tmp_path))
  for step in sorted(rng.choice(10**6, 20, replace=False).tolist()):
    values = {tag: float(v) for tag, v in zip(tags, rng.normal(0, 1e3, 3))
              if rng.random() < 0.7}
    writer.scalars(step, values)
    for tag, value in values.items():
      written[tag][step] = value
  writer.close()
  events = EventAccumulator(str(tmp_path), size_guidance={'scalars': 0}).Reload()
  for tag, expected in written.items():
    shown = {e.step: e.value for e in events.Scalars(tag)}
    assert shown == {step: pytest.approx(float(np.float32(v))) for step, v in expected.items()}
