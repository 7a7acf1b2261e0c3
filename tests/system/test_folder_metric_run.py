"""A run on your own images evaluated with nothing downloaded: `evaluate` on a tiny teacher
trained on the example shapes folder picks the folder metric by itself (`--metric=auto`)
and needs no Inception weights or reference statistics; and the whole path, from a folder
with a corrupt file to a 2-step CD student sampled with class names and scored."""
import json
import os
import subprocess
import sys

from multistep_cm.data import image_folder
from multistep_cm.training import loop as train

from helpers import file_config
from helpers import REPO
from helpers import run_module


def test_evaluate_scores_a_folder_run_with_the_folder_metric(tmp_path):
  subprocess.run([sys.executable, os.path.join(REPO, "docs", "examples", "make_shapes.py"),
                  f"--out={tmp_path / 'images'}", "--num=80", "--size=8"], check=True,
                 capture_output=True)
  data_dir = str(tmp_path / "tfds")
  image_folder.build(str(tmp_path / "images"), "shapes", data_dir, holdout=20, progress=False)
  config = file_config("tests/tiny_image_config.py", {
      "data.dataset": "folder:shapes", "data.data_dir": data_dir, "data.num_classes": 2,
      "num_train_steps": 2, "checkpoint_every_steps": 2})
  workdir = tmp_path / "teacher"
  train.train_and_evaluate(config, str(workdir))
  run_module("multistep_cm.evaluate", f"--workdir={workdir}", "--steps=2", "--samplers=ddim",
             "--num_samples=16", "--batch_size=16", f"--output={tmp_path / 'eval'}",
             env={"MULTISTEP_CM_CACHE": tmp_path / "cache"})
  with open(tmp_path / "eval.json") as fh:
    record = json.load(fh)
  assert "folder-cnn-8px" in record["header"]["metric"], record["header"]
  assert "trained on folder:shapes" in record["header"]["metric"]
  (row,) = record["rows"]
  assert row["fd"] > 0 and row["reference_num_samples"] == 20 and 0 <= row["accuracy"] <= 1
  assert len(os.listdir(tmp_path / "cache")) == 1  # the classifier, trained and cached


def test_a_folder_from_prepare_to_a_scored_student(tmp_path):
  """Issue 27's whole path on the example folder with one corrupt file: prepared (the file
  skipped), a tiny teacher and a 2-step CD student trained on it, the student sampled with
  the class names on the grid's rows, and scored by `evaluate` with the folder metric."""
  import numpy as np  # pylint: disable=g-import-not-at-top
  from multistep_cm.sampling import images  # pylint: disable=g-import-not-at-top
  from PIL import Image  # pylint: disable=g-import-not-at-top
  subprocess.run([sys.executable, os.path.join(REPO, "docs", "examples", "make_shapes.py"),
                  f"--out={tmp_path / 'images'}", "--num=80", "--size=8"], check=True,
                 capture_output=True)
  (tmp_path / "images" / "circle" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n cut")
  data_dir = str(tmp_path / "tfds")
  _, record = image_folder.build(str(tmp_path / "images"), "shapes", data_dir, holdout=20,
                                 skip_bad=True, progress=False)
  assert [s["file"] for s in record["skipped"]] == ["circle/broken.png"]
  data = {"data.dataset": "folder:shapes", "data.data_dir": data_dir, "data.num_classes": 2,
          "sample_every_steps": 0}
  train.train_and_evaluate(file_config("tests/tiny_image_config.py", {
      **data, "num_train_steps": 2, "checkpoint_every_steps": 2}), str(tmp_path / "teacher"))
  student = file_config("tests/tiny_image_config.py", {
      **data, "num_train_steps": 2, "checkpoint_every_steps": 2, "loss.mode": "cd",
      "loss.student_steps": 2, "loss.teacher_steps_start": 8, "loss.teacher_steps_end": 16,
      "loss.anneal_steps": 0, "teacher_checkpoint": str(tmp_path / "teacher"),
      "init_from": str(tmp_path / "teacher")})
  train.train_and_evaluate(student, str(tmp_path / "cd2"))
  out = tmp_path / "cd2.npz"
  run_module("multistep_cm.sample", f"--workdir={tmp_path / 'cd2'}", "--num_samples=8",
             f"--output={out}", "--progress=false")
  drawn = np.load(out)
  x = drawn["images"].astype(np.float32) / 127.5 - 1.0  # the uint8 samples back in [-1, 1]
  grid = np.asarray(Image.open(tmp_path / "cd2.png"))
  named = images.image_grid(x, drawn["labels"], class_names=("circle", "square"))
  np.testing.assert_array_equal(grid.reshape(named.shape), named)  # the names on the rows
  assert not np.array_equal(named, images.image_grid(x, drawn["labels"]))
  run_module("multistep_cm.evaluate", f"--workdir={tmp_path / 'cd2'}", "--num_samples=16",
             "--batch_size=16", f"--output={tmp_path / 'eval'}",
             env={"MULTISTEP_CM_CACHE": tmp_path / "cache"})
  with open(tmp_path / "eval.json") as fh:
    (row,) = json.load(fh)["rows"]
  assert row["steps"] == 2 and row["fd"] > 0 and 0 <= row["accuracy"] <= 1
