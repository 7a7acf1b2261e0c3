"""A synthetic, ImageNet-shaped TFDS dataset written on the spot.

It has ImageNet's features (variable-size JPEG `'image'`, `'label'`), is written
as array_record like a prepared ImageNet, and is read back through the same
`TfdsSource` path, so tests and benchmarks exercise the real reader offline.
Images are smooth random colour fields plus pixel noise: they compress and
decode roughly like photographs, unlike pure noise.
"""
import io

import numpy as np
from PIL import Image
import tensorflow_datasets as tfds

from multistep_cm.data import tfds_source

NAME = tfds_source.SYNTHETIC


def synthetic_jpeg(index: int, width: int, height: int, quality: int = 90) -> bytes:
  """JPEG bytes of the synthetic image `index` (deterministic)."""
  rng = np.random.default_rng(index)
  coarse = rng.integers(0, 256, (height // 32 + 2, width // 32 + 2, 3), dtype=np.uint8)
  smooth = np.asarray(Image.fromarray(coarse).resize((width, height), Image.Resampling.BICUBIC))
  noisy = smooth.astype(np.int16) + rng.integers(-12, 13, smooth.shape, dtype=np.int16)
  buffer = io.BytesIO()
  Image.fromarray(np.clip(noisy, 0, 255).astype(np.uint8)).save(buffer, "JPEG", quality=quality)
  return buffer.getvalue()


class SyntheticJpeg(tfds.core.GeneratorBasedBuilder):
  """ImageNet-like examples: `{'image': JPEG, 'label': ClassLabel(10)}`, splits train/validation."""

  VERSION = tfds.core.Version("1.0.0")
  RELEASE_NOTES = {"1.0.0": "First version."}

  def __init__(self, *, num_examples: int = 64, size_range=(24, 64), corrupt=(), **kwargs):
    """Configures what `download_and_prepare` writes; reading needs no arguments.

    Args:
      num_examples: examples in 'train'; 'validation' gets a quarter (at least 1).
      size_range: (min, max) of the independently drawn width and height.
      corrupt: train indices whose image bytes are replaced by bytes that are not
        an image, to test the corrupted-record error.
      **kwargs: passed to `tfds.core.GeneratorBasedBuilder` (data_dir, file_format).
    """
    self._num_examples, self._size_range, self._corrupt = num_examples, size_range, set(corrupt)
    super().__init__(**kwargs)

  def _info(self):
    return tfds.core.DatasetInfo(
        builder=self,
        description="Synthetic ImageNet-shaped JPEGs for tests and benchmarks.",
        features=tfds.features.FeaturesDict({
            "image": tfds.features.Image(encoding_format="jpeg"),
            "label": tfds.features.ClassLabel(num_classes=10),
        }),
        # Keep generation order on disk, so example i is the i-th generated one and
        # tests can name the index of the corrupted record.
        disable_shuffling=True,
    )

  def _split_generators(self, dl_manager):
    del dl_manager  # nothing to download
    return {
        "train": self._generate_examples(self._num_examples, 0),
        "validation": self._generate_examples(max(1, self._num_examples // 4), 1 << 20),
    }

  def _generate_examples(self, num_examples, offset):
    lo, hi = self._size_range
    for i in range(num_examples):
      width, height = np.random.default_rng([offset + i, 7]).integers(lo, hi + 1, size=2)
      image = b"corrupt: not an image" if offset == 0 and i in self._corrupt else (
          synthetic_jpeg(offset + i, int(width), int(height)))
      yield i, {"image": image, "label": (offset + i) % 10}


def build(data_dir: str, file_format: str = "array_record", **kwargs) -> SyntheticJpeg:
  """Writes the synthetic dataset into `data_dir`; kwargs as `SyntheticJpeg.__init__`."""
  tfds_source.ensure_tfds_can_prepare()
  builder = SyntheticJpeg(data_dir=data_dir, file_format=file_format, **kwargs)
  builder.download_and_prepare()
  return builder
