"""A run on your own images evaluated with nothing downloaded: `evaluate` on a tiny teacher
trained on the example shapes folder picks the folder metric by itself (`--metric=auto`)
and needs no Inception weights or reference statistics."""
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
