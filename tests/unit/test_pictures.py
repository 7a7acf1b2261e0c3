"""Pictures people read: sample grids (sampling/images.py), the quality-vs-NFE figure (evaluate), and
both through the TensorFlow-free TensorBoard writer (runtime/metric_log.py) back out of TensorBoard's
reader."""
import numpy as np
from PIL import Image
import pytest

from multistep_cm.evaluation import report
from multistep_cm.runtime import metric_log
from multistep_cm.sampling import images

from helpers import read_images


def _samples(rng, shape):
  """Samples in [-1, 1] whose uint8 pictures are the returned integers exactly."""
  pixels = rng.integers(0, 256, shape, dtype=np.uint8)
  return pixels / 127.5 - 1.0, pixels


def _check_tiles(grid, pixels, layout):
  """Each sample's tile is its picture upscaled by repetition; every other pixel right of
  the label column is background. Returns the mask of tile pixels."""
  tiles = np.zeros(grid.shape[:2], bool)
  for r, (_, indices) in enumerate(layout.rows):
    for q, i in enumerate(indices):
      y, x = layout.tile_origin(r, q)
      expected = np.kron(pixels[i], np.ones((layout.scale, layout.scale, 1), np.uint8))
      np.testing.assert_array_equal(grid[y:y + layout.tile_h, x:x + layout.tile_w], expected)
      assert not tiles[y:y + layout.tile_h, x:x + layout.tile_w].any(), "tiles overlap"
      tiles[y:y + layout.tile_h, x:x + layout.tile_w] = True
  outside = ~tiles
  outside[:, :layout.label_w] = False
  assert np.all(grid[outside] == images.BACKGROUND)
  return tiles


def test_a_class_with_more_samples_than_a_rows_width_wraps():
  """100 samples of 2 classes: 10 columns (a square grid's), each class on 5 rows named on
  its first only, every sample once and in its order."""
  labels = np.repeat([0, 1], 50)
  layout = images.grid_layout(100, 16, 16, labels, class_names=["circle", "square"])
  assert [text for text, _ in layout.rows] == ["circle"] + [""] * 4 + ["square"] + [""] * 4
  assert [len(idx) for _, idx in layout.rows] == [10] * 10
  assert [i for _, idx in layout.rows for i in idx] == list(range(100))
  grid = images.image_grid(_samples(np.random.default_rng(1), (100, 16, 16, 3))[0], labels,
                           class_names=["circle", "square"])
  assert grid.shape == layout.shape + (3,)


def test_labelled_grid_rows_per_class_upscaled_tiles_apart_labels_beside():
  rng = np.random.default_rng(0)
  samples, pixels = _samples(rng, (7, 8, 8, 1))
  labels = np.array([3, 1, 3, 0, 1, 3, 9])
  grid = images.image_grid(samples, labels)
  layout = images.grid_layout(7, 8, 8, labels)
  assert [(text, list(idx)) for text, idx in layout.rows] == [
      ("0", [3]), ("1", [1, 4]), ("3", [0, 2, 5]), ("9", [6])]
  assert layout.tile_h == layout.tile_w == 64 and layout.scale == 8  # 8 px -> 64 px
  assert layout.gap >= 2 and layout.label_w > layout.gap
  assert grid.shape == (5 * layout.gap + 4 * 64, layout.label_w + 4 * layout.gap + 3 * 64, 1)
  assert grid.dtype == np.uint8
  _check_tiles(grid, pixels, layout)
  # The label column: ink beside each row only, a different mark for each label.
  column = grid[:, :layout.label_w, 0]
  marks = []
  for r in range(4):
    y, _ = layout.tile_origin(r, 0)
    band = column[y:y + 64]
    assert (band < 128).sum() > 10, f"no label beside row {r}"
    marks.append(band < 128)
    column[y:y + 64] = images.BACKGROUND
  assert np.all(column == images.BACKGROUND), "ink outside the rows' bands"
  assert len({m.tobytes() for m in marks}) == 4


def test_unlabelled_colour_grid_is_square_without_a_label_column():
  rng = np.random.default_rng(1)
  samples, pixels = _samples(rng, (10, 16, 16, 3))
  grid = images.image_grid(samples)
  layout = images.grid_layout(10, 16, 16)
  assert layout.label_w == 0 and layout.scale == 4
  assert [len(idx) for _, idx in layout.rows] == [4, 4, 2]
  assert grid.shape == layout.shape + (3,)
  tiles = _check_tiles(grid, pixels, layout)
  assert tiles.sum() == 10 * 64 * 64


def test_large_images_are_not_upscaled_and_wrong_labels_are_refused():
  assert images.grid_layout(4, 64, 64).scale == 1
  assert images.grid_layout(4, 100, 80).tile_w == 80
  with pytest.raises(ValueError, match="labels of shape"):
    images.image_grid(np.zeros((4, 8, 8, 1)), np.arange(3))


_HEADER = {"workdir": "/tmp/runs", "metric": "digits classifier", "primary": "fd",
           "num_samples": 100, "seed": 0, "weights": "ema0", "date": "2026-11-27"}


def _row(run, mode, sampler, nfe, fd, step=20):
  return {"run": run, "mode": mode, "sampler": sampler, "nfe": nfe, "checkpoint_step": step,
          "weights": "EMA 0.999", "fd": fd, "accuracy": 0.5}


_ROWS = [
    _row("cd4", "cd", "Multistep CM, 4 steps (DDIM, Algorithm 2)", 4, 30.0),
    _row("teacher", "diffusion", "DDIM, 1 step", 1, 900.0),
    _row("teacher", "diffusion", "DDIM, 4 steps", 4, 200.0),
    _row("teacher", "diffusion", "DDIM, 16 steps", 16, 40.0),
    _row("teacher", "diffusion", "aDDIM, 4 steps, x_var 0.1/(2+SNR)", 4, 150.0, step=40),
    _row("teacher", "diffusion", "aDDIM, 16 steps, x_var 0.1/(2+SNR)", 16, 25.0, step=40),
    _row("cd1", "cd", "Multistep CM, 1 step (DDIM, Algorithm 2)", 1, 80.0),
]


def test_quality_figure_lines_per_sampler_points_per_student_log_nfe():
  fig = report.quality_figure(_ROWS, _HEADER)
  (ax,) = fig.axes
  drawn = {line.get_label(): (list(line.get_xdata()), list(line.get_ydata()))
           for line in ax.get_lines()}
  assert drawn == {
      "teacher: DDIM": ([1, 4, 16], [900.0, 200.0, 40.0]),
      "teacher: aDDIM, x_var 0.1/(2+SNR)": ([4, 16], [150.0, 25.0]),
      "cd4: CD, S=4": ([4], [30.0]),
      "cd1: CD, S=1": ([1], [80.0]),
  }
  students = [line for line in ax.get_lines() if line.get_label().startswith("cd")]
  assert all(line.get_linestyle() == "None" for line in students)  # points, not lines
  assert ax.get_xscale() == "log"
  assert ax.get_yscale() == "log"  # FD from 25 to 900: more than a factor of 10
  assert "NFE" in ax.get_xlabel() and ax.get_ylabel() == "digits FD, lower is better"
  assert {t.get_text() for t in ax.get_legend().get_texts()} == set(drawn)


def test_rows_nfe_is_the_x_axis_not_the_step_count():
  """A sampler costing two evaluations per step (Heun) is drawn at its NFE."""
  rows = [_row("teacher", "diffusion", "Heun, 4 steps", 7, 50.0),
          _row("teacher", "diffusion", "Heun, 8 steps", 15, 20.0)]
  (ax,) = report.quality_figure(rows, _HEADER).axes
  (line,) = ax.get_lines()
  assert list(line.get_xdata()) == [7, 15]
  assert ax.get_yscale() == "linear"  # FD from 20 to 50


def test_figure_and_grid_reach_tensorboard_without_tensorflow(tmp_path, monkeypatch):
  """Through tensorboardX's writer (clu's: test_sampling_eval.py, from a training run)."""
  monkeypatch.setattr(metric_log, "tensorflow_available", lambda: False)
  prefix = str(tmp_path / "eval_ema0")
  png = report.write_figure(_ROWS, _HEADER, prefix)
  written = np.asarray(Image.open(png).convert("RGB"))
  assert written.shape[0] >= 400 and written.shape[1] >= 600
  # The grid as the trainer writes it ([1, H, W, 1] uint8).
  grid = images.image_grid(_samples(np.random.default_rng(2), (6, 8, 8, 1))[0],
                           np.array([0, 0, 0, 5, 5, 5]))
  writer = metric_log.create_writer(str(tmp_path / "run"))
  writer.write_images(30, {"samples": grid[None]})
  writer.close()
  (step, figure), = read_images(prefix)["quality_vs_nfe"]
  assert step == 40  # the newest checkpoint step of the rows
  np.testing.assert_array_equal(figure[..., :3], written)
  (step, read), = read_images(tmp_path / "run")["samples"]
  assert step == 30
  if read.ndim == 3:  # tensorboardX writes one channel as RGB
    assert read.shape == grid.shape[:2] + (3,) and np.all(read == read[..., :1])
    read = read[..., 0]
  np.testing.assert_array_equal(read, grid[..., 0])
