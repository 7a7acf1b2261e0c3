"""Your own images end to end on the command line: `prepare --images` on a folder of two
classes with one corrupt file, then the main job refuses a config whose number of classes
disagrees with the folder (one line, before anything compiles) and trains a tiny teacher on
it when they agree; an EDM `dataset_tool` zip is prepared and checked the same way."""
import io
import json
import os
import zipfile

import numpy as np
from PIL import Image

from multistep_cm.data import image_folder

from helpers import assert_one_line_error
from helpers import run_main
from helpers import run_module

TINY_IMAGE = "tests/tiny_image_config.py"  # a one-level UViT on 8x8 RGB


def test_prepare_then_train_on_a_class_folder(tmp_path):
  rng = np.random.default_rng(0)
  for name in ("circles", "squares"):
    os.makedirs(tmp_path / "in" / name)
    for i in range(12):
      Image.fromarray(rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)).save(
          tmp_path / "in" / name / f"{i:02d}.png")
  (tmp_path / "in" / "squares" / "oops.png").write_bytes(b"\x89PNG\r\n\x1a\n truncated")
  data_dir = tmp_path / "tfds"
  args = [f"--images={tmp_path / 'in'}", "--name=shapes", f"--data_dir={data_dir}"]
  proc = run_module("multistep_cm.data.prepare", *args, check=False)
  assert_one_line_error(proc, 2, "squares/oops.png", "--skip_bad")
  proc = run_module("multistep_cm.data.prepare", *args, "--skip_bad", "--holdout=0.25")
  assert "skipped 1 unreadable file(s): squares/oops.png" in proc.stderr
  assert "--config.data.num_classes=2" in proc.stderr
  record = image_folder.read_record("shapes", str(data_dir))
  assert record["splits"] == {"train": 18, "validation": 6}

  data = {"data.dataset": "folder:shapes", "data.data_dir": data_dir, "num_train_steps": 3,
          "checkpoint_every_steps": 3}
  # tests/tiny_image_config.py says 10 classes; the folder has 2.
  proc = run_main(TINY_IMAGE, tmp_path / "refused", data, check=False)
  assert_one_line_error(proc, 2, "config.data.num_classes=10, but it holds 2 classes "
                        "(circles, squares)", "--config.data.num_classes=2")
  assert "Compiled the train step" not in proc.stderr
  assert not os.path.exists(tmp_path / "refused" / "config.json")

  workdir = tmp_path / "teacher"
  run_main(TINY_IMAGE, workdir, {**data, "data.num_classes": 2})
  assert os.path.isdir(workdir / "checkpoints" / "3")


def test_an_edm_zip_prepares_and_its_classes_are_checked(tmp_path):
  """EDM's layout, labels 0 and 2 in dataset.json: 3 classes (max + 1, as EDM counts)."""
  rng = np.random.default_rng(1)
  labels = []
  with zipfile.ZipFile(tmp_path / "edm.zip", "w") as z:
    for i in range(8):
      name = f"00000/img{i:08d}.png"
      out = io.BytesIO()
      Image.fromarray(rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)).save(out, format="PNG")
      z.writestr(name, out.getvalue())
      labels.append([name, 2 * (i % 2)])
    z.writestr("dataset.json", json.dumps({"labels": labels}))
  data_dir = tmp_path / "tfds"
  proc = run_module("multistep_cm.data.prepare", f"--images={tmp_path / 'edm.zip'}",
                    "--name=edm", f"--data_dir={data_dir}")
  assert "folder:edm: train 8 images of 8x8x3, 3 classes (0, 1, 2), edm layout" in proc.stderr
  proc = run_main(TINY_IMAGE, tmp_path / "refused",
                  {"data.dataset": "folder:edm", "data.data_dir": data_dir,
                   "data.num_classes": 2}, check=False)
  assert_one_line_error(proc, 2, "config.data.num_classes=2, but it holds 3 classes (0, 1, 2)",
                        "--config.data.num_classes=3")
