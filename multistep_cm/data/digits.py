"""The embedded dataset: scikit-learn's bundled 8x8 handwritten digits.

1797 grey-scale images of the digits 0-9 ship inside scikit-learn, so the main
job, the tests and the digits metric run on a fresh machine with no download.
Pixels (0..16) are scaled to [-1, 1]; images can be upsampled to 16x16 with
bilinear interpolation (half-pixel centres) for the models that need a
resolution divisible by more poolings.

Everything here is numpy: input code runs before `jax.distributed.initialize`
on multi-host jobs, so it must not start a JAX backend.
"""
import functools

import numpy as np

from multistep_cm.data import sources

NUM_CLASSES = 10
NUM_EXAMPLES = 1797
# A fixed split so every process, run and metric agrees on held-out images.
_SPLIT_SEED = 0
_TEST_FRACTION = 0.2
SPLITS = ("train", "test", "all")
IMAGE_SIZES = (8, 16, 32)


def _bilinear_matrix(size_in: int, size_out: int) -> np.ndarray:
  """Rows interpolate `size_in` samples at `size_out` half-pixel centres."""
  centres = (np.arange(size_out) + 0.5) * size_in / size_out - 0.5
  centres = np.clip(centres, 0, size_in - 1)
  lo = np.floor(centres).astype(int)
  hi = np.minimum(lo + 1, size_in - 1)
  frac = centres - lo
  weights = np.zeros((size_out, size_in))
  weights[np.arange(size_out), lo] += 1 - frac
  weights[np.arange(size_out), hi] += frac
  return weights


@functools.lru_cache(maxsize=None)
def _all_digits(image_size: int):
  from sklearn import datasets  # pylint: disable=g-import-not-at-top
  bunch = datasets.load_digits()
  images = bunch.images.astype(np.float64) / 16.0 * 2.0 - 1.0  # [N, 8, 8] in [-1, 1]
  if image_size != 8:
    w = _bilinear_matrix(8, image_size)
    images = np.einsum("hi,nij,wj->nhw", w, images, w)
  images = images[..., None].astype(np.float32)
  labels = bunch.target.astype(np.int32)
  assert len(labels) == NUM_EXAMPLES, len(labels)
  return images, labels


def load_digits(split: str = "train", image_size: int = 8):
  """Returns `(images, labels)`: float32 [N, S, S, 1] in [-1, 1] and int32 [N].

  Args:
    split: "train" (80% of a fixed permutation), "test" (the other 20%) or "all".
    image_size: 8 (native), 16 or 32 (bilinear upsampling).
  """
  if image_size not in IMAGE_SIZES:
    raise ValueError(f"digits image_size must be one of {IMAGE_SIZES}, got {image_size}")
  images, labels = _all_digits(image_size)
  idx = split_indices(split)
  return images[idx].copy(), labels[idx].copy()


def split_indices(split: str) -> np.ndarray:
  """Sorted indices into the 1797 examples that make up `split`."""
  if split not in SPLITS:
    raise ValueError(f"digits split must be one of {SPLITS}, got {split!r}")
  if split == "all":
    return np.arange(NUM_EXAMPLES)
  perm = np.random.default_rng(_SPLIT_SEED).permutation(NUM_EXAMPLES)
  num_test = int(round(_TEST_FRACTION * NUM_EXAMPLES))
  return np.sort(perm[num_test:] if split == "train" else perm[:num_test])


class DigitsSource(sources.ArraySource):
  """The embedded digits as a data source: `'image'` [S, S, 1] and `'label'` (`load_digits`)."""

  def __init__(self, split: str = "train", image_size: int = 8):
    images, labels = load_digits(split, image_size)
    super().__init__({"image": images, "label": labels}, num_classes=NUM_CLASSES)
