"""Your own images from the files to a scored student, with nothing downloaded (issue 27's
whole path), for both layouts a user brings: a tiny teacher trained on an EDM `dataset_tool`
zip (`dataset.json` labels) of the example shapes, and a 2-step CD student of it trained on
the same shapes as a class-subfolder folder with one corrupt file. The student is sampled
with the class names on the grid's rows, and `evaluate` scores teacher and student with the
folder metric, which it picks by itself (`--metric=auto`) and which needs no Inception
weights or reference statistics."""
import io
import json
import os
import subprocess
import sys
import zipfile

import numpy as np
from PIL import Image

from multistep_cm.data import image_folder
from multistep_cm.sampling import images
from multistep_cm.training import loop as train

from helpers import file_config
from helpers import REPO
from helpers import run_module

CLASSES = ("circle", "square")


def _edm_zip(folder, path):
  """The folder's images in EDM's layout: a zip with `dataset.json` of [file, class]."""
  labels = []
  with zipfile.ZipFile(path, "w") as z:
    for label, kind in enumerate(CLASSES):
      for name in sorted(os.listdir(folder / kind)):
        if name.endswith(".png") and name != "broken.png":
          member = f"{label:05d}/{kind}_{name}"
          z.write(folder / kind / name, member)
          labels.append([member, label])
    z.writestr("dataset.json", json.dumps({"labels": labels}))
  return len(labels)


def _evaluate(workdir, out, cache, *flags):
  run_module("multistep_cm.evaluate", f"--workdir={workdir}", "--num_samples=16",
             "--batch_size=16", f"--output={out}", *flags, env={"MULTISTEP_CM_CACHE": cache})
  with open(f"{out}.json") as fh:
    return json.load(fh)


def test_a_zip_teacher_and_a_folder_student_from_files_to_scores(tmp_path):
  subprocess.run([sys.executable, os.path.join(REPO, "docs", "examples", "make_shapes.py"),
                  f"--out={tmp_path / 'images'}", "--num=80", "--size=8"], check=True,
                 capture_output=True)
  (tmp_path / "images" / "circle" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n cut")
  assert _edm_zip(tmp_path / "images", tmp_path / "shapes.zip") == 80
  data_dir = str(tmp_path / "tfds")
  _, record = image_folder.build(str(tmp_path / "images"), "shapes", data_dir, holdout=20,
                                 skip_bad=True, progress=False)
  assert [s["file"] for s in record["skipped"]] == ["circle/broken.png"]
  _, zipped = image_folder.build(str(tmp_path / "shapes.zip"), "shapes_zip", data_dir,
                                 holdout=20, progress=False)
  assert zipped["layout"] == "edm" and zipped["splits"] == {"train": 60, "validation": 20}

  common = {"data.data_dir": data_dir, "data.num_classes": 2, "sample_every_steps": 0,
            "num_train_steps": 2, "checkpoint_every_steps": 2}
  teacher = tmp_path / "teacher"
  train.train_and_evaluate(file_config("tests/tiny_image_config.py", {
      **common, "data.dataset": "folder:shapes_zip"}), str(teacher))
  cache = tmp_path / "cache"
  scored = _evaluate(teacher, tmp_path / "teacher_eval", cache, "--steps=2", "--samplers=ddim")
  assert "folder-cnn-8px" in scored["header"]["metric"], scored["header"]
  assert "trained on folder:shapes_zip" in scored["header"]["metric"]
  (row,) = scored["rows"]
  assert row["fd"] > 0 and row["reference_num_samples"] == 20 and 0 <= row["accuracy"] <= 1
  assert len(os.listdir(cache)) == 1  # the zip dataset's classifier, trained and cached

  student = tmp_path / "cd2"
  train.train_and_evaluate(file_config("tests/tiny_image_config.py", {
      **common, "data.dataset": "folder:shapes", "loss.mode": "cd", "loss.student_steps": 2,
      "loss.teacher_steps_start": 8, "loss.teacher_steps_end": 16, "loss.anneal_steps": 0,
      "teacher_checkpoint": str(teacher), "init_from": str(teacher)}), str(student))
  out = tmp_path / "cd2.npz"
  run_module("multistep_cm.sample", f"--workdir={student}", "--num_samples=8",
             f"--output={out}", "--progress=false")
  drawn = np.load(out)
  x = drawn["images"].astype(np.float32) / 127.5 - 1.0  # the uint8 samples back in [-1, 1]
  grid = np.asarray(Image.open(tmp_path / "cd2.png"))
  named = images.image_grid(x, drawn["labels"], class_names=CLASSES)
  np.testing.assert_array_equal(grid.reshape(named.shape), named)  # the names on the rows
  assert not np.array_equal(named, images.image_grid(x, drawn["labels"]))
  scored = _evaluate(student, tmp_path / "cd2_eval", cache)
  assert "trained on folder:shapes" in scored["header"]["metric"]
  (row,) = scored["rows"]
  assert row["steps"] == 2 and row["fd"] > 0 and 0 <= row["accuracy"] <= 1
  assert len(os.listdir(cache)) == 2  # and the folder's own
