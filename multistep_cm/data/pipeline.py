"""The input pipeline: which examples each process feeds at each step, decoded ahead by Grain.

The data order is a pure function of `(seed, step)`, because it is a Grain `MapDataset`
(random access by index), not an iterator with a state:
  - Positions `[k*B, (k+1)*B)` of an infinite stream make the global batch of step
    k (B = `global_batch_size`). Position `pos` belongs to epoch `e = pos // N` (N =
    `len(source)`) and reads example `perm(s + e)[pos % N]`: the stream is
    `MapDataset.range(N).shuffle(s).repeat()`, whose epoch e is Grain's keyed index
    shuffle (`grain.experimental.index_shuffle`, a bijection of [0, N) computed per
    index, so a batch costs O(batch) and no permutation is stored) under key `s + e`
    (`permute`). Every epoch visits every example once, in its own order.
  - Process p of P reads only the contiguous positions
    `[k*B + p*B/P, k*B + (p+1)*B/P)`: the stream cut into blocks of B/P (`batch`),
    every P-th block from the p-th (`[p::P]`). The process-local batches, concatenated
    in process order, are exactly the global batch a single process would read.
  - Per-example randomness (the horizontal flip) comes from Grain's `random_map`, whose
    generator is Philox keyed by a seed with the position in its counter, so it does not
    depend on P either.
Hence the checkpointable input state is just the next step number: a run resumed
at step k, on any number of hosts, sees exactly what an uninterrupted run sees
from step k (step k is element k of the dataset; nothing is replayed). Nothing else
needs saving. Batches carry `'index'` (the examples' ids in the source) so this can be
checked on the data itself. The shuffle and flip seeds (32-bit, as Grain takes them)
are derived from the run's seed by NumPy's `SeedSequence`.

Decoding: Grain reads whole process-local batches ahead of the consumer, either in a
thread pool (`workers='threads'`, `to_iter_dataset`; Pillow releases the GIL to decode
and resample) or in worker processes (`workers='processes'`, `mp_prefetch`: worker w
decodes steps w, w+W, ... and Grain interleaves them back in step order). The number
and kind of workers change who decodes a batch, never what it holds. `to_global`
assembles the process-local arrays into global `jax.Array`s with
`jax.make_array_from_process_local_data`.

Typical use in a trainer:

  source = config_build.make_source(config)
  shard_index, shard_count = pipeline.batch_shard(batch_sharding, config.batch_size)
  data = pipeline.Pipeline(source, config.batch_size, config.seed, shard_index, shard_count,
                           random_flip=config.data.random_flip, workers=config.data.workers)
  for step, batch in zip(range(start_step, num_steps), data.iterate(start_step)):
    batch = pipeline.to_global(batch, batch_sharding)
"""
from collections.abc import Iterator, Mapping, Sequence
import os
import time

from absl import flags
import grain
from grain import experimental as grain_experimental
import numpy as np

from multistep_cm.data.sources import Source

# The decode workers `Pipeline(workers=...)` (and config.data.workers) accept.
WORKERS = ("threads", "processes")
# The rounds of Grain's index shuffle in `MapDataset.shuffle` (its shuffle.py), so that
# `permute` is the permutation the pipeline's dataset applies.
_SHUFFLE_ROUNDS = 4


def permute(offsets: np.ndarray, n: int, key: int) -> np.ndarray:
  """Applies Grain's keyed pseudo-random permutation of [0, n) to `offsets`.

  This is the permutation `MapDataset.shuffle` gives epoch e under key `seed + e`. Each
  offset is mapped independently, so a batch costs O(batch), not O(n).

  Args:
    offsets: int array of values in [0, n).
    n: the domain size, >= 1.
    key: the permutation's key (non-negative int; Grain's keys are 32-bit, so only the
      low 32 bits count).

  Returns:
    int64 array, same shape as `offsets`.
  """
  offsets = np.asarray(offsets, np.int64)
  if n < 1 or offsets.size and (offsets.min() < 0 or offsets.max() >= n):
    raise ValueError(f"offsets must lie in [0, {n})")
  key = int(key) % 2**32
  shuffle = grain_experimental.index_shuffle
  out = [shuffle(int(o), n - 1, key, _SHUFFLE_ROUNDS) for o in offsets.ravel()]
  return np.asarray(out, np.int64).reshape(offsets.shape)


def _flip_coin(example_id: int, rng: np.random.Generator) -> tuple[int, bool]:
  return example_id, bool(rng.integers(2))


def _no_flip(example_id: int) -> tuple[int, bool]:
  return example_id, False


class _Read:
  """(example ids, flips) of one process-local batch -> the batch's arrays.

  A module-level class, so Grain can pickle it (with the source) into worker processes.
  """

  def __init__(self, source: Source):
    self.source = source

  def __call__(self, ids_and_flips) -> dict[str, np.ndarray]:
    ids, flips = ids_and_flips
    ids = np.asarray(ids, np.int64)
    batch = dict(self.source.get(ids))
    if flips.any():
      image = batch["image"]
      batch["image"] = np.where(flips.reshape((-1,) + (1,) * (image.ndim - 1)),
                                image[:, :, ::-1], image)
    batch["label"] = np.asarray(batch["label"], np.int32)
    batch["index"] = ids
    return batch


class Pipeline:
  """Deterministic, sharded, prefetching batches from a random-access `Source`, on Grain.

  See the module docstring for the order. Batches are dicts of process-local
  numpy arrays: the source's keys (e.g. `'image'` float32 [b, H, W, C]), plus
  `'label'` int32 [b] and `'index'` int64 [b] (example ids in the source), with
  b = global_batch_size / process_count.
  """

  def __init__(self, source: Source, global_batch_size: int, seed: int,
               process_index: int | None = None, process_count: int | None = None,
               random_flip: bool = False, shuffle: bool = True, num_threads: int | None = None,
               prefetch: int = 2, chunk_size: int | None = None, workers: str = "threads"):
    """Configures the pipeline; nothing is read until a batch is asked for.

    Args:
      source: random-access examples (picklable, for `workers='processes'`).
      global_batch_size: examples per step over all processes.
      seed: selects the epoch permutations and the flips (non-negative int).
      process_index, process_count: this process's shard of each global batch;
        default `jax.process_index()` and `jax.process_count()` (which start the
        JAX backend). Processes that hold replicas of the same batch rows pass the
        same index (see `batch_shard`).
      random_flip: mirror `'image'` along its width for half of the examples.
      shuffle: False reads positions in order (epoch e, position i -> example i),
        e.g. for evaluation.
      num_threads: decode workers (threads or processes, see `workers`); default: the
        CPU cores this process may use. 0 decodes in the calling thread.
      prefetch: steps decoded ahead of the one `iterate` is yielding (at least one per
        worker, so that every worker has a batch to decode).
      chunk_size: unused; Grain decodes a whole process-local batch per task. Accepted
        so that callers written for the earlier thread pool keep working.
      workers: 'threads' (Grain's read threads) or 'processes' (Grain's `mp_prefetch`
        worker processes, which need a picklable source).

    Raises:
      ValueError: for a batch size not divisible by the process count, a process
        index out of range, `random_flip` without an `'image'` key, or unknown `workers`.
    """
    del chunk_size
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
    if workers not in WORKERS:
      raise ValueError(f"workers={workers!r} must be one of {WORKERS}")
    self.source, self.seed = source, int(seed)
    self.global_batch_size, self.random_flip, self.shuffle = global_batch_size, random_flip, shuffle
    self.process_index, self.process_count = process_index, process_count
    self.local_batch_size = global_batch_size // process_count
    self.num_threads = _available_cores() if num_threads is None else num_threads
    self.prefetch, self.workers = max(0, prefetch), workers
    self._open = []  # iterators `close` stops

    # The order (module docstring), as Grain datasets indexed by position and by step.
    self._shuffle_seed, flip_seed = (
        int(s) for s in np.random.SeedSequence(self.seed).generate_state(2, np.uint32))
    ids = grain.MapDataset.range(len(source))
    if shuffle:
      ids = ids.shuffle(seed=self._shuffle_seed)
    ids = ids.repeat()  # epoch e reshuffled under key seed + e
    self._stream = (ids.random_map(_flip_coin, seed=flip_seed) if random_flip
                    else ids.map(_no_flip))  # position -> (example id, flip)
    local = self._stream.batch(self.local_batch_size, drop_remainder=True)
    self._batches = local[process_index::process_count].map(_Read(source))  # step -> batch

  # -- The order: pure functions of (seed, step). --

  def positions(self, step: int) -> np.ndarray:
    """This process's stream positions for `step`, int64 [local_batch_size]."""
    start = step * self.global_batch_size + self.process_index * self.local_batch_size
    return np.arange(start, start + self.local_batch_size, dtype=np.int64)

  def example_indices(self, positions: np.ndarray) -> np.ndarray:
    """The source index read at each stream position."""
    return np.asarray([self._stream[int(p)][0] for p in np.ravel(positions)],
                      np.int64).reshape(np.shape(positions))

  def _epoch_key(self, epoch: int) -> int:
    """The key of epoch `epoch`'s permutation (`permute`), as Grain's shuffle derives it."""
    return (self._shuffle_seed + epoch) % 2**32

  def flips(self, positions: np.ndarray) -> np.ndarray:
    """Whether the example at each position is mirrored, bool."""
    return np.asarray([self._stream[int(p)][1] for p in np.ravel(positions)],
                      bool).reshape(np.shape(positions))

  # -- Reading. --

  def get_batch(self, step: int) -> dict[str, np.ndarray]:
    """The process-local batch of training step `step`, decoded now in the calling thread."""
    return self._batches[step]

  def iterate(self, start_step: int = 0, num_steps: int | None = None) -> Iterator[dict]:
    """Yields `get_batch(start_step)`, `get_batch(start_step + 1)`, ... decoding ahead.

    A resumed run passes its restored step number as `start_step`: Grain starts reading
    at that element, so no earlier batch is decoded.

    Args:
      start_step: the first step yielded.
      num_steps: how many batches to yield; None is endless.
    """
    stop = None if num_steps is None else start_step + num_steps
    batches = iter(self._loader(self._batches[start_step:stop]))
    self._open.append(batches)
    try:
      if self.workers == "processes" and self.num_threads:
        # Plain arrays: Grain's shared-memory views would outlive their module at exit.
        for batch in batches:
          yield {k: np.array(v) for k, v in batch.items()}
      else:
        yield from batches
    finally:  # an abandoned iterator stops its workers
      batches.close()
      self._open.remove(batches)

  def _loader(self, batches: grain.MapDataset) -> grain.IterDataset:
    """`batches` read ahead by this pipeline's workers."""
    inline = grain.ReadOptions(num_threads=0, prefetch_buffer_size=0)
    if self.num_threads == 0:
      return batches.to_iter_dataset(inline)
    if self.workers == "threads":
      return batches.to_iter_dataset(grain.ReadOptions(
          num_threads=self.num_threads,
          prefetch_buffer_size=max(self.prefetch, self.num_threads)))
    if not flags.FLAGS.is_parsed():
      # Grain reads its absl flags when it starts workers; outside an absl app (tests,
      # benchmarks) nothing parses them, so they keep their defaults.
      flags.FLAGS.mark_as_parsed()
    per_worker = max(1, -(-self.prefetch // self.num_threads))
    return batches.to_iter_dataset(inline).mp_prefetch(grain.MultiprocessingOptions(
        num_workers=self.num_threads, per_worker_buffer_size=per_worker))

  def close(self):
    """Stops the decoding workers of every open iterator."""
    for batches in list(self._open):
      batches.close()

  def __enter__(self):
    return self

  def __exit__(self, *exc):
    self.close()


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

  With worker processes the warm-up is at least one batch per worker (their start-up
  is not timed) and the CPU time includes theirs.

  Returns:
    `images_per_s` (wall clock), `images_per_s_per_core` (over the decoding
    workers, capped by the cores available), `images_per_cpu_s` (per second of
    CPU time the process and its workers used: the per-core rate, robust to other
    load on the machine), `cores`, `seconds`, `num_images`.
  """
  if pipeline.workers == "processes":
    warmup_steps = max(warmup_steps, pipeline.num_threads)
  batches = pipeline.iterate(start_step)
  for _ in range(warmup_steps):
    next(batches)
  wall, cpu = time.perf_counter(), _cpu_seconds()
  for _ in range(num_steps):
    next(batches)
  wall, cpu = time.perf_counter() - wall, _cpu_seconds() - cpu
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


def _cpu_seconds() -> float:
  """CPU time of this process and its live children (Grain's worker processes)."""
  import psutil  # pylint: disable=g-import-not-at-top
  total = time.process_time()
  for child in psutil.Process().children(recursive=True):
    try:
      times = child.cpu_times()
      total += times.user + times.system
    except psutil.NoSuchProcess:
      pass
  return total
