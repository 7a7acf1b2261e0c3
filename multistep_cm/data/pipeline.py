"""The input pipeline: which examples each process feeds at each step, decoded ahead.

The data order is a pure function of `(seed, step)`:
  - Positions `[k*B, (k+1)*B)` of an infinite stream make the global batch of step
    k (B = `global_batch_size`). Position `pos` belongs to epoch `pos // N` (N =
    `len(source)`) and reads example `perm(seed, epoch)[pos % N]`, where `perm` is
    a keyed pseudo-random bijection of [0, N) (a small Feistel block cipher with
    cycle walking: the idea behind `tf.random_index_shuffle` and Grain's index
    shuffle). Every epoch visits every example once, in its own order.
  - Process p of P reads only the contiguous positions
    `[k*B + p*B/P, k*B + (p+1)*B/P)`, so the process-local batches, concatenated
    in process order, are exactly the global batch a single process would read.
  - Per-example randomness (the horizontal flip) is a hash of `(seed, pos)`, so it
    does not depend on P either.
Hence the checkpointable input state is just the next step number: a run resumed
at step k, on any number of hosts, sees exactly what an uninterrupted run sees
from step k. Nothing else needs saving. Batches carry `'index'` (the examples' ids
in the source) so this can be checked on the data itself.

Decoding runs in a thread pool (Pillow releases the GIL to decode and resample), `prefetch`
steps ahead of the consumer. `to_global` assembles the process-local arrays into
global `jax.Array`s with `jax.make_array_from_process_local_data`.

Typical use in a trainer:

  source = config_build.make_source(config)
  shard_index, shard_count = pipeline.batch_shard(batch_sharding, config.batch_size)
  data = pipeline.Pipeline(source, config.batch_size, config.seed, shard_index, shard_count,
                           random_flip=config.data.random_flip)
  for step, batch in zip(range(start_step, num_steps), data.iterate(start_step)):
    batch = pipeline.to_global(batch, batch_sharding)
"""
import collections
from collections.abc import Iterator, Mapping, Sequence
import concurrent.futures
import os
import threading
import time

import numpy as np

from multistep_cm.data.sources import Source

# ---------------------------------------------------------------------------
# Counter-based randomness: a pure function of its integer inputs, identical on
# every host and NumPy version (unlike a Generator's stream, which NumPy may change).

_U64 = np.uint64
_GOLDEN = _U64(0x9E3779B97F4A7C15)
_SHUFFLE, _FLIP = 1, 2  # stream tags, so the permutation and the flips are independent
_FEISTEL_ROUNDS = 6
_MAX_CACHED_ORDER = 1 << 24  # epochs of up to 16M examples are held as one int64 array


def _mix(x: np.ndarray) -> np.ndarray:
  """splitmix64's finaliser: a bijective, well-mixed map of uint64 arrays."""
  x = (x ^ (x >> _U64(30))) * _U64(0xBF58476D1CE4E5B9)
  x = (x ^ (x >> _U64(27))) * _U64(0x94D049BB133111EB)
  return x ^ (x >> _U64(31))


def _hash(*words) -> np.ndarray:
  """uint64 hash of non-negative integers or integer arrays (broadcast together)."""
  h = np.zeros(np.broadcast_shapes(*(np.shape(w) for w in words)) or (1,), _U64)
  for w in words:
    w = np.asarray(int(w) % (1 << 64), _U64) if np.ndim(w) == 0 else np.asarray(w).astype(_U64)
    h = _mix(h ^ (w + _GOLDEN))
  return h


def permute(offsets: np.ndarray, n: int, key: int) -> np.ndarray:
  """Applies the keyed pseudo-random permutation of [0, n) to `offsets`.

  A balanced Feistel network is a bijection of [0, 4^h) for any round function;
  cycle walking (re-applying it until the value lands in [0, n)) restricts it to a
  bijection of [0, n). Each offset is mapped independently, so a batch costs
  O(batch), not O(n), and no permutation is ever stored.

  Args:
    offsets: int array of values in [0, n).
    n: the domain size, >= 1.
    key: the permutation's key (non-negative int).

  Returns:
    int64 array, same shape as `offsets`.
  """
  offsets = np.asarray(offsets, np.int64)
  if n < 1 or offsets.size and (offsets.min() < 0 or offsets.max() >= n):
    raise ValueError(f"offsets must lie in [0, {n})")
  half = max(1, ((n - 1).bit_length() + 1) // 2)  # 4^half >= n, and < 4n
  mask = _U64((1 << half) - 1)
  keys = [_hash(key, r) for r in range(_FEISTEL_ROUNDS)]

  def feistel(x):
    left, right = x >> _U64(half), x & mask
    for round_key in keys:
      left, right = right, left ^ (_hash(round_key, right) & mask)
    return (left << _U64(half)) | right

  out = offsets.reshape(-1).astype(_U64)
  todo = np.arange(out.size)
  values = out.copy()
  while todo.size:
    values = feistel(values)
    inside = values < _U64(n)
    out[todo[inside]] = values[inside]
    todo, values = todo[~inside], values[~inside]
  return out.astype(np.int64).reshape(offsets.shape)


# ---------------------------------------------------------------------------
# The pipeline.


class Pipeline:
  """Deterministic, sharded, prefetching batches from a random-access `Source`.

  See the module docstring for the order. Batches are dicts of process-local
  numpy arrays: the source's keys (e.g. `'image'` float32 [b, H, W, C]), plus
  `'label'` int32 [b] and `'index'` int64 [b] (example ids in the source), with
  b = global_batch_size / process_count.
  """

  def __init__(self, source: Source, global_batch_size: int, seed: int,
               process_index: int | None = None, process_count: int | None = None,
               random_flip: bool = False, shuffle: bool = True, num_threads: int | None = None,
               prefetch: int = 2, chunk_size: int = 16):
    """Configures the pipeline; nothing is read until a batch is asked for.

    Args:
      source: random-access examples.
      global_batch_size: examples per step over all processes.
      seed: selects the epoch permutations and the flips (non-negative int).
      process_index, process_count: this process's shard of each global batch;
        default `jax.process_index()` and `jax.process_count()` (which start the
        JAX backend). Processes that hold replicas of the same batch rows pass the
        same index (see `batch_shard`).
      random_flip: mirror `'image'` along its width for half of the examples.
      shuffle: False reads positions in order (epoch e, position i -> example i),
        e.g. for evaluation.
      num_threads: decoding threads; default: the CPU cores this process may use.
        0 decodes in the calling thread.
      prefetch: steps decoded ahead of the one `iterate` is yielding.
      chunk_size: examples per decoding task.

    Raises:
      ValueError: for a batch size not divisible by the process count, a process
        index out of range, or `random_flip` without an `'image'` key.
    """
    if process_index is None or process_count is None:
      import jax  # pylint: disable=g-import-not-at-top
      process_index = jax.process_index() if process_index is None else process_index
      process_count = jax.process_count() if process_count is None else process_count
    if global_batch_size < 1 or global_batch_size % process_count:
      raise ValueError(f"global_batch_size={global_batch_size} must be a positive multiple of "
                       f"process_count={process_count}")
    if not 0 <= process_index < process_count:
      raise ValueError(f"process_index={process_index} must lie in [0, {process_count})")
    if seed < 0:
      raise ValueError(f"seed must be a non-negative int, got {seed}")
    if random_flip and "image" not in source[0]:
      raise ValueError("random_flip=True needs examples with an 'image' [H, W, C] key; "
                       f"this source has {sorted(source[0])}")
    self.source, self.seed = source, int(seed)
    self.global_batch_size, self.random_flip, self.shuffle = global_batch_size, random_flip, shuffle
    self.process_index, self.process_count = process_index, process_count
    self.local_batch_size = global_batch_size // process_count
    self.num_threads = _available_cores() if num_threads is None else num_threads
    self.prefetch, self.chunk_size = max(0, prefetch), max(1, chunk_size)
    self._num_examples = len(source)
    self._pool = None
    self._orders, self._order_lock = {}, threading.Lock()

  # -- The order: pure functions of (seed, step). --

  def positions(self, step: int) -> np.ndarray:
    """This process's stream positions for `step`, int64 [local_batch_size]."""
    start = step * self.global_batch_size + self.process_index * self.local_batch_size
    return np.arange(start, start + self.local_batch_size, dtype=np.int64)

  def example_indices(self, positions: np.ndarray) -> np.ndarray:
    """The source index read at each stream position."""
    epochs, offsets = np.divmod(positions, self._num_examples)
    if not self.shuffle:
      return offsets
    out = np.empty_like(offsets)
    for epoch in np.unique(epochs):  # a batch spans at most a few epochs
      sel = epochs == epoch
      order = self._epoch_order(int(epoch))
      out[sel] = (order[offsets[sel]] if order is not None else
                  permute(offsets[sel], self._num_examples, self._epoch_key(int(epoch))))
    return out

  def _epoch_key(self, epoch: int) -> int:
    return int(_hash(self.seed, _SHUFFLE, epoch)[0])

  def _epoch_order(self, epoch: int) -> np.ndarray | None:
    """The whole epoch's permutation, computed once (numpy overhead, not the per-index work,
    dominates a batch's permutation: digits cost 1.3 ms per batch, 1.7 ms per epoch); None
    for datasets too large to hold one (> 2^24 examples)."""
    if self._num_examples > _MAX_CACHED_ORDER:
      return None
    with self._order_lock:
      if epoch not in self._orders:
        if len(self._orders) >= 2:  # the current epoch and the next
          self._orders.pop(min(self._orders))
        self._orders[epoch] = permute(np.arange(self._num_examples), self._num_examples,
                                      self._epoch_key(epoch))
      return self._orders[epoch]

  def flips(self, positions: np.ndarray) -> np.ndarray:
    """Whether the example at each position is mirrored, bool."""
    if not self.random_flip:
      return np.zeros(positions.shape, bool)
    return (_hash(self.seed, _FLIP, positions) & _U64(1)).astype(bool)

  # -- Reading. --

  def get_batch(self, step: int) -> dict[str, np.ndarray]:
    """The process-local batch of training step `step` (decoded now, in the pool)."""
    return self._assemble(self._submit(step))

  def iterate(self, start_step: int = 0, num_steps: int | None = None) -> Iterator[dict]:
    """Yields `get_batch(start_step)`, `get_batch(start_step + 1)`, ... decoding ahead.

    A resumed run passes its restored step number as `start_step`.

    Args:
      start_step: the first step yielded.
      num_steps: how many batches to yield; None is endless.
    """
    stop = None if num_steps is None else start_step + num_steps
    pending = collections.deque()
    next_step = start_step
    try:
      while True:
        while len(pending) <= self.prefetch and (stop is None or next_step < stop):
          pending.append(self._submit(next_step))
          next_step += 1
        if not pending:
          return
        yield self._assemble(pending.popleft())
    finally:
      for tasks in pending:  # an abandoned iterator stops decoding what it will never yield
        for task in tasks:
          task.cancel()

  def close(self):
    """Stops the decoding threads; the pipeline restarts them if used again."""
    if self._pool is not None:
      self._pool.shutdown(wait=True, cancel_futures=True)
      self._pool = None

  def __enter__(self):
    return self

  def __exit__(self, *exc):
    self.close()

  def _submit(self, step: int) -> list:
    """Starts decoding `step` in chunks; returns their futures (or results, with 0 threads)."""
    positions = self.positions(step)
    chunks = [positions[i:i + self.chunk_size] for i in range(0, len(positions), self.chunk_size)]
    if self.num_threads == 0:
      return [_Done(self._load(chunk)) for chunk in chunks]
    if self._pool is None:
      self._pool = concurrent.futures.ThreadPoolExecutor(self.num_threads, "input")
    return [self._pool.submit(self._load, chunk) for chunk in chunks]

  def _load(self, positions: np.ndarray) -> dict[str, np.ndarray]:
    indices = self.example_indices(positions)
    batch = dict(self.source.get(indices))
    flips = self.flips(positions)
    if flips.any():
      image = batch["image"]
      batch["image"] = np.where(flips.reshape((-1,) + (1,) * (image.ndim - 1)),
                                image[:, :, ::-1], image)
    batch["label"] = np.asarray(batch["label"], np.int32)
    batch["index"] = indices
    return batch

  @staticmethod
  def _assemble(tasks: list) -> dict[str, np.ndarray]:
    chunks = [task.result() for task in tasks]  # re-raises a worker's DatasetError here
    if len(chunks) == 1:
      return chunks[0]
    return {k: np.concatenate([c[k] for c in chunks]) for k in chunks[0]}


class _Done:
  """A finished 'future', for decoding without threads."""

  def __init__(self, value):
    self._value = value

  def result(self):
    return self._value

  def cancel(self):
    return False


def _available_cores() -> int:
  try:
    return len(os.sched_getaffinity(0))
  except AttributeError:  # not on Linux
    return os.cpu_count() or 1


class ExampleIdLog:
  """A debug record of what each train step consumed: `<dir>/example_ids.<process>.txt`.

  One line per step, `step id id ...`: the `'index'` of this process's rows, in
  batch order, so a resumed run can be compared with an uninterrupted one on the
  data itself. Opened at a resume step, it drops the lines of later steps (a run
  killed after its last checkpoint consumed them, and the resumed run consumes them
  again), so the file always reads as one uninterrupted run. Local paths only.
  """

  def __init__(self, directory: str, process_index: int, start_step: int):
    self.path = os.path.join(directory, f"example_ids.{process_index}.txt")
    kept = [line for line in _read_lines(self.path) if int(line.split(" ", 1)[0]) <= start_step]
    with open(self.path, "w") as fh:
      fh.writelines(kept)
    self._file = open(self.path, "a")  # pylint: disable=consider-using-with

  def write(self, step: int, ids: np.ndarray):
    self._file.write(f"{step} {' '.join(str(int(i)) for i in np.asarray(ids).ravel())}\n")
    self._file.flush()  # a killed run keeps what it consumed

  def close(self):
    self._file.close()


def read_example_ids(directory: str, process_index: int = 0) -> dict[int, np.ndarray]:
  """`{step: example ids}` from the `ExampleIdLog` of process `process_index` in `directory`."""
  out = {}
  for line in _read_lines(os.path.join(directory, f"example_ids.{process_index}.txt")):
    step, *ids = line.split()
    out[int(step)] = np.asarray(ids, np.int64)
  return out


def _read_lines(path: str) -> list[str]:
  if not os.path.exists(path):
    return []
  with open(path) as fh:
    return [line for line in fh if line.strip()]


# ---------------------------------------------------------------------------
# Building sources from a config, and global arrays from local batches.


def batch_shard(sharding, global_batch_size: int) -> tuple[int, int]:
  """`(process_index, process_count)` to give `Pipeline` for a batch sharding.

  Reads which rows of a [global_batch_size, ...] array this process's devices
  hold under `sharding`. They must form one contiguous block of equal size for
  every process (the usual data-parallel layout, with the mesh's devices ordered
  by process); processes holding the same rows (replicas) get the same index.

  Raises:
    ValueError: if the rows of this process are not one aligned contiguous block.
  """
  slices = [idx[0] if idx else slice(None) for idx in
            sharding.addressable_devices_indices_map((global_batch_size,)).values()]
  return _shard_of_rows(slices, global_batch_size)


def _shard_of_rows(slices: Sequence[slice], global_batch_size: int) -> tuple[int, int]:
  rows = set()
  for s in slices:
    rows.update(range(*s.indices(global_batch_size)))
  start, size = min(rows), len(rows)
  if rows != set(range(start, start + size)) or global_batch_size % size or start % size:
    raise ValueError(
        f"this process holds batch rows {sorted(rows)} of {global_batch_size}, not one aligned "
        "contiguous block; order the mesh devices by process (e.g. jax.make_mesh) so each "
        "process's devices hold consecutive batch rows")
  return start // size, global_batch_size // size


def to_global(batch: Mapping[str, np.ndarray], sharding, global_batch_size: int | None = None):
  """Process-local numpy batch -> dict of global `jax.Array`s sharded by `sharding`.

  Args:
    batch: a `Pipeline` batch (leading axis: this process's rows).
    sharding: a `jax.sharding.Sharding` for the leading (batch) axis, e.g.
      `NamedSharding(mesh, P('data'))`; used for every key.
    global_batch_size: the global leading size; default: inferred from `sharding`
      assuming every process holds distinct rows.
  """
  import jax  # pylint: disable=g-import-not-at-top
  out = {}
  for key, local in batch.items():
    shape = None if global_batch_size is None else (global_batch_size,) + local.shape[1:]
    out[key] = jax.make_array_from_process_local_data(sharding, local, shape)
  return out


def measure_throughput(pipeline: Pipeline, num_steps: int, start_step: int = 0,
                       warmup_steps: int = 1) -> dict[str, float]:
  """Images per second this process's pipeline delivers through `iterate`.

  Returns:
    `images_per_s` (wall clock), `images_per_s_per_core` (over the decoding
    threads, capped by the cores available), `images_per_cpu_s` (per second of
    CPU time the process used: the per-core rate, robust to other load on the
    machine), `cores`, `seconds`, `num_images`.
  """
  batches = pipeline.iterate(start_step)
  for _ in range(warmup_steps):
    next(batches)
  wall, cpu = time.perf_counter(), time.process_time()
  for _ in range(num_steps):
    next(batches)
  wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
  batches.close()
  num_images = num_steps * pipeline.local_batch_size
  cores = max(1, min(pipeline.num_threads, _available_cores()))
  return {
      "images_per_s": num_images / wall,
      "images_per_s_per_core": num_images / wall / cores,
      "images_per_cpu_s": num_images / max(cpu, 1e-9),
      "cores": float(cores),
      "seconds": wall,
      "num_images": float(num_images),
  }
