"""The pipeline on Grain: what each process decodes, resumption without replay, and
decode workers (threads or processes) that never change a batch."""
import threading

import numpy as np
import pytest

from multistep_cm.data import pipeline
from multistep_cm.data import sources


class RecordingSource(sources.ArraySource):
  """An ArraySource that records the example ids it is asked to read (from any thread)."""

  def __init__(self, n: int, bad_id: int | None = None):
    rng = np.random.default_rng(1)
    super().__init__({"image": rng.uniform(-1, 1, (n, 4, 4, 1)).astype(np.float32),
                      "label": np.arange(n) % 3})
    self.bad_id, self.read, self._lock = bad_id, [], threading.Lock()

  def get(self, indices):
    indices = np.asarray(indices)
    if self.bad_id in indices:
      raise sources.DatasetError(f"example {self.bad_id} is unreadable")
    with self._lock:
      self.read.extend(int(i) for i in indices)
    return super().get(indices)

  def __getstate__(self):  # worker processes get their own (unshared) lock
    return {k: v for k, v in self.__dict__.items() if k != "_lock"}

  def __setstate__(self, state):
    self.__dict__.update(state, _lock=threading.Lock())


def test_each_process_decodes_only_its_own_positions():
  """Grain's batch-and-slice gives process p the rows the position arithmetic names (module
  docstring), and the source is asked for exactly those examples, no others."""
  n, batch, count = 30, 12, 3  # batches straddle epochs
  for p in range(count):
    source = RecordingSource(n)
    data = pipeline.Pipeline(source, batch, seed=7, process_index=p, process_count=count,
                             random_flip=True, num_threads=0)
    for step in (0, 2, 5):
      got = data.get_batch(step)
      positions = data.positions(step)
      np.testing.assert_array_equal(positions // batch, step)
      np.testing.assert_array_equal(positions % batch // (batch // count), p)
      np.testing.assert_array_equal(got["index"], data.example_indices(positions))
      flips = data.flips(positions)
      original = source.get(got["index"])["image"]
      np.testing.assert_array_equal(got["image"][flips], original[flips][:, :, ::-1])
      np.testing.assert_array_equal(got["image"][~flips], original[~flips])
    source.read.clear()
    data.get_batch(4)
    assert sorted(source.read) == sorted(data.example_indices(data.positions(4)).tolist())


@pytest.mark.parametrize("num_threads", [0, 3])
def test_resume_decodes_nothing_before_its_step(num_threads):
  """A run resumed at step 9 starts reading at step 9: Grain indexes the step directly, so
  no earlier batch is decoded and skipped."""
  source = RecordingSource(40)
  data = pipeline.Pipeline(source, 8, seed=0, process_index=0, process_count=1,
                           num_threads=num_threads, prefetch=4)
  got = list(data.iterate(9, 3))
  expected = [data.example_indices(data.positions(step)) for step in (9, 10, 11)]
  for batch, ids in zip(got, expected):
    np.testing.assert_array_equal(batch["index"], ids)
  assert sorted(source.read) == sorted(np.concatenate(expected).tolist())


def test_worker_kind_and_count_never_change_a_batch():
  """Threads (1 or 3) and two worker processes yield the batches `get_batch` computes in
  the calling thread, bitwise; an unreadable example's DatasetError comes out of a worker
  process as itself, at its step (the trainer turns it into exit 3)."""
  kwargs = dict(global_batch_size=10, seed=2, process_index=1, process_count=2,
                random_flip=True, prefetch=3)
  want = [pipeline.Pipeline(RecordingSource(50), num_threads=0, **kwargs).get_batch(s)
          for s in range(4, 9)]

  def check(got, want, what):
    assert got.keys() == want.keys()
    for key in got:
      assert type(got[key]) is np.ndarray  # pylint: disable=unidiomatic-typecheck
      np.testing.assert_array_equal(got[key], want[key], err_msg=f"{what} {key}")

  for num_threads in (1, 3):
    with pipeline.Pipeline(RecordingSource(50), num_threads=num_threads, **kwargs) as data:
      got = list(data.iterate(4, 5))
    assert len(got) == 5
    for a, b in zip(got, want):
      check(a, b, f"{num_threads} threads")
  # Processes (spawned once, so the unreadable example is read in the same run): steps 4 and
  # 5, then step 6's error.
  earlier = set(want[0]["index"].tolist()) | set(want[1]["index"].tolist())
  bad = next(int(i) for i in want[2]["index"] if int(i) not in earlier)
  with pipeline.Pipeline(RecordingSource(50, bad_id=bad), num_threads=2, workers="processes",
                         **kwargs) as data:
    batches = data.iterate(4, 5)
    for b in want[:2]:
      check(next(batches), b, "2 processes")
    with pytest.raises(sources.DatasetError, match=f"example {bad} is unreadable"):
      next(batches)


def test_unknown_workers_are_refused():
  with pytest.raises(ValueError, match="workers='fibers'.*threads.*processes"):
    pipeline.Pipeline(RecordingSource(4), 2, 0, 0, 1, workers="fibers")
