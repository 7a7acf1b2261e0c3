"""Samples as pictures: uint8 conversion, a readable grid of samples, PNG files (local or GCS)."""
import dataclasses

import numpy as np


def to_uint8(samples: np.ndarray) -> np.ndarray:
  """[-1, 1] floats -> uint8 images (round to nearest, clip)."""
  return np.clip(np.round((np.asarray(samples) + 1.0) * 127.5), 0, 255).astype(np.uint8)


# Grids are read by people: each tile upscaled (nearest neighbour, so pixels stay pixels) to
# at least MIN_TILE pixels, tiles apart by a gap of background, one row per class with the
# label written beside it.
MIN_TILE = 64
BACKGROUND = 255  # white: digits are white on black, so black tiles stand apart on it
INK = 0  # the labels' colour


@dataclasses.dataclass(frozen=True)
class GridLayout:
  """Where each sample of a grid goes: `rows` holds `(label text, sample indices)` per row."""
  tile_h: int
  tile_w: int
  scale: int
  gap: int
  label_w: int  # the label column's width (0: no labels)
  rows: tuple[tuple[str, tuple[int, ...]], ...]

  @property
  def shape(self) -> tuple[int, int]:
    cols = max(len(idx) for _, idx in self.rows)
    return (self.gap + len(self.rows) * (self.tile_h + self.gap),
            self.label_w + self.gap + cols * (self.tile_w + self.gap))

  def tile_origin(self, row: int, col: int) -> tuple[int, int]:
    """Top-left pixel of the tile at (row, col)."""
    return (self.gap + row * (self.tile_h + self.gap),
            self.label_w + self.gap + col * (self.tile_w + self.gap))


def _font(tile_h: int):
  from PIL import ImageFont  # pylint: disable=g-import-not-at-top
  # Pillow's built-in font (no file to download); a fixed-size bitmap font where Pillow
  # was built without FreeType.
  return ImageFont.load_default(size=max(10, min(32, tile_h * 3 // 8)))


def grid_layout(num: int, height: int, width: int, labels=None,
                min_tile: int = MIN_TILE, class_names=None) -> GridLayout:
  """The layout of `num` samples of `height` x `width`: with `labels`, one row per distinct
  label (in increasing order, samples in their order; a long one wraps); without, as square
  as fits. With
  `class_names`, a row of class id k is written `class_names[k]` (ids beyond them, such as
  the null class, as their number)."""
  scale = max(1, -(-min_tile // min(height, width)))
  tile_h, tile_w = height * scale, width * scale
  gap = max(2, tile_h // 16)
  if labels is None:
    cols = int(np.ceil(np.sqrt(num)))
    rows = tuple(("", tuple(range(r, min(r + cols, num)))) for r in range(0, num, cols))
    return GridLayout(tile_h, tile_w, scale, gap, 0, rows)
  labels = np.asarray(labels)
  if labels.shape != (num,):
    raise ValueError(f"image grid: {num} samples but labels of shape {labels.shape}")
  # Class ids in increasing order; text (prompts) in the order it first appears.
  distinct = (np.unique(labels) if labels.dtype.kind in "iub"
              else list(dict.fromkeys(labels.tolist())))
  names = tuple(class_names or ())
  text = lambda label: (names[label] if labels.dtype.kind in "iu" and 0 <= label < len(names)
                        else str(label))
  # A label with more samples than a square grid's columns (and 10) wraps onto further
  # rows, its text on the first: 100 samples of 2 classes are 10 rows of 10, not 2 of 50.
  cols = max(10, int(np.ceil(np.sqrt(num))))
  rows = []
  for label in distinct:
    members = [int(i) for i in np.flatnonzero(labels == label)]
    rows += [(text(label) if start == 0 else "", tuple(members[start:start + cols]))
             for start in range(0, len(members), cols)]
  rows = tuple(rows)
  font = _font(tile_h)
  label_w = 2 * gap + max(int(np.ceil(font.getlength(text))) for text, _ in rows)
  return GridLayout(tile_h, tile_w, scale, gap, label_w, rows)


def image_grid(samples: np.ndarray, labels=None, min_tile: int = MIN_TILE,
               class_names=None) -> np.ndarray:
  """[N, H, W, C] in [-1, 1] -> one uint8 [rows*H', cols*W', C] picture (`grid_layout`):
  tiles upscaled to at least `min_tile` pixels, a background gap between them, and with
  `labels` ([N] ints, or strings such as prompts) one row per label, written at its left
  (an int label k as `class_names[k]` where given: a dataset's `source.class_names`)."""
  from PIL import Image  # pylint: disable=g-import-not-at-top
  from PIL import ImageDraw  # pylint: disable=g-import-not-at-top
  samples = to_uint8(samples)
  n, h, w, c = samples.shape
  layout = grid_layout(n, h, w, labels, min_tile, class_names)
  grid = np.full(layout.shape + (c,), BACKGROUND, np.uint8)
  for r, (_, indices) in enumerate(layout.rows):
    for q, i in enumerate(indices):
      y, x = layout.tile_origin(r, q)
      grid[y:y + layout.tile_h, x:x + layout.tile_w] = np.repeat(
          np.repeat(samples[i], layout.scale, axis=0), layout.scale, axis=1)
  if layout.label_w:
    picture = Image.fromarray(grid[..., 0] if c == 1 else grid)
    draw, font = ImageDraw.Draw(picture), _font(layout.tile_h)
    for r, (text, _) in enumerate(layout.rows):
      y, _ = layout.tile_origin(r, 0)
      # Right-aligned against the row's first tile, centred on the row.
      draw.text((layout.label_w - layout.gap, y + layout.tile_h // 2), text,
                fill=INK if c == 1 else (INK,) * c, font=font, anchor="rm")
    grid = np.array(picture).reshape(grid.shape)
  return grid


def save_png(grid: np.ndarray, path: str):
  """Writes a uint8 grid as PNG; `path` may be local or on GCS."""
  from etils import epath  # pylint: disable=g-import-not-at-top
  from PIL import Image  # pylint: disable=g-import-not-at-top
  with epath.Path(path).open("wb") as fh:
    Image.fromarray(grid[..., 0] if grid.shape[-1] == 1 else grid).save(fh, format="PNG")
