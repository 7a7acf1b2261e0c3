"""Samples as pictures: uint8 conversion, a grid of samples, PNG files (local or GCS)."""
import numpy as np


def to_uint8(samples: np.ndarray) -> np.ndarray:
  """[-1, 1] floats -> uint8 images (round to nearest, clip)."""
  return np.clip(np.round((np.asarray(samples) + 1.0) * 127.5), 0, 255).astype(np.uint8)


def image_grid(images: np.ndarray) -> np.ndarray:
  """[N, H, W, C] in [-1, 1] -> one uint8 [rows*H, cols*W, C] grid, as square as fits."""
  images = to_uint8(images)
  n, h, w, c = images.shape
  cols = int(np.ceil(np.sqrt(n)))
  rows = int(np.ceil(n / cols))
  grid = np.zeros((rows * h, cols * w, c), np.uint8)
  for i, img in enumerate(images):
    r, q = divmod(i, cols)
    grid[r * h:(r + 1) * h, q * w:(q + 1) * w] = img
  return grid


def save_png(grid: np.ndarray, path: str):
  """Writes a uint8 grid as PNG; `path` may be local or on GCS."""
  from etils import epath  # pylint: disable=g-import-not-at-top
  from PIL import Image  # pylint: disable=g-import-not-at-top
  with epath.Path(path).open("wb") as fh:
    Image.fromarray(grid[..., 0] if grid.shape[-1] == 1 else grid).save(fh, format="PNG")
