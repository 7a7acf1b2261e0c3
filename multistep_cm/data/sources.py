"""Random-access data sources: example `i` of a dataset as a dict of numpy arrays.

A source knows nothing about batches, shuffling or processes; `pipeline.Pipeline`
decides which indices each process reads at each step. Every source yields at
least:
  - `'label'`: int32 class id. Unlabelled data uses the null class, whose id is
    `source.num_classes` (0 for a dataset with no classes), so a class-conditional
    model with `num_classes + 1` embeddings sees it as "unconditional".
  - the data itself: `'image'` float32 [H, W, C] in [-1, 1] for image sources, or
    any other keys (the toy mixture uses `'x'` [D]).

Everything here is numpy: input code runs before `jax.distributed.initialize`
on multi-host jobs, so it must not start a JAX backend.
"""
from collections.abc import Mapping, Sequence

import numpy as np



class DatasetError(RuntimeError):
  """A dataset is missing, unprepared or has a record that cannot be read.

  The message is one self-contained paragraph (what failed, where, and the
  command that fixes it), so a trainer can print it and exit non-zero.
  """


class Source:
  """Base class: `len(source)`, `source[i]` and the batched `source.get(indices)`.

  Subclasses implement `__len__` and `__getitem__` (which makes them Grain data
  sources too); `get` stacks single examples and may be overridden where a batched
  read is faster. Sources must be safe to call from several threads at once (Grain's
  read threads), and picklable for Grain's worker processes
  (`Pipeline(workers='processes')`).
  """

  num_classes: int = 0
  # The names of classes 0 .. num_classes - 1 where the dataset has them (sample-grid rows).
  class_names: tuple[str, ...] | None = None

  def __len__(self) -> int:
    raise NotImplementedError

  def __getitem__(self, index: int) -> dict[str, np.ndarray]:
    raise NotImplementedError

  def get(self, indices: Sequence[int]) -> dict[str, np.ndarray]:
    """Returns the examples at `indices`, each key stacked along a new axis 0."""
    examples = [self[int(i)] for i in indices]
    return {k: np.stack([ex[k] for ex in examples]) for k in examples[0]}


class ArraySource(Source):
  """In-memory examples: row `i` of every array is example `i`.

  Used for the digits, the toy mixture (`{'x': samples}`) and in tests. A missing `'label'`
  is filled with the null class.
  """

  def __init__(self, arrays: Mapping[str, np.ndarray], num_classes: int | None = None):
    """Wraps `arrays`, which all share their leading dimension.

    Args:
      arrays: name -> array [N, ...].
      num_classes: number of classes; by default `max(label) + 1`, or 0 when there
        is no `'label'`.
    """
    arrays = {k: np.asarray(v) for k, v in arrays.items()}
    sizes = {k: v.shape[0] if v.ndim else None for k, v in arrays.items()}
    if not arrays or len(set(sizes.values())) != 1 or None in sizes.values():
      raise ValueError(f"ArraySource needs arrays with one shared leading dimension, got {sizes}")
    (size,) = set(sizes.values())
    if size == 0:
      raise ValueError("ArraySource needs at least one example")
    if "label" in arrays:
      labels = arrays["label"].astype(np.int32)
      self.num_classes = int(labels.max()) + 1 if num_classes is None else num_classes
    else:
      self.num_classes = 0 if num_classes is None else num_classes
      labels = np.full(size, self.num_classes, np.int32)  # the null class
    self._arrays = {**arrays, "label": labels}
    self._size = size

  def __len__(self) -> int:
    return self._size

  def __getitem__(self, index: int) -> dict[str, np.ndarray]:
    return {k: v[index] for k, v in self._arrays.items()}

  def get(self, indices: Sequence[int]) -> dict[str, np.ndarray]:
    indices = np.asarray(indices, np.int64)
    return {k: v[indices] for k, v in self._arrays.items()}

