"""The folder metric: FD in the features of a CNN trained on a prepared folder's own images.

The example folder of docs/examples/make_shapes.py (circles and squares, RGB) is written and
prepared once, labelled (class subfolders) and unlabelled (the same files in one folder).
"""
import os
import shutil
import subprocess
import sys

import ml_collections
import numpy as np
import pytest

from multistep_cm.data import image_folder
from multistep_cm.evaluation import folder_metric
from multistep_cm.evaluation import report
from multistep_cm.evaluation import sample_metrics
from multistep_cm.sampling import runs
from helpers import child_env
from helpers import REPO


@pytest.fixture(scope="module")
def shapes(tmp_path_factory):
  root = tmp_path_factory.mktemp("shapes")
  subprocess.run([sys.executable, os.path.join(REPO, "docs", "examples", "make_shapes.py"),
                  f"--out={root / 'images'}", "--num=160", "--size=16"], check=True,
                 capture_output=True)
  flat = root / "flat"
  flat.mkdir()
  for kind in ("circle", "square"):
    for name in os.listdir(root / "images" / kind):
      shutil.copy(root / "images" / kind / name, flat / f"{kind}_{name}")
  data_dir = str(root / "tfds")
  image_folder.build(str(root / "images"), "shapes", data_dir, holdout=40, progress=False)
  image_folder.build(str(flat), "flat", data_dir, holdout=40, progress=False)
  image_folder.build(str(root / "images" / "circle"), "no_holdout", data_dir, holdout=0,
                     progress=False)
  return data_dir, str(root / "cache")


def config_of(dataset, data_dir):
  return ml_collections.ConfigDict({"seed": 0, "data": {
      "dataset": dataset, "data_dir": data_dir, "image_size": 16}})


def ranks_real_blurred_noise(table):
  fd = [m["fd"] for m in table.values()]
  real, blurred, *noise = fd
  return real < blurred < min(noise)


def test_a_labelled_folder_trains_a_classifier_that_ranks_real_blurred_noise(shapes):
  data_dir, cache = shapes
  data = folder_metric.load_data("folder:shapes", data_dir)
  assert data.train.shape == (120, 16, 16, 3) and data.held_out.shape == (40, 16, 16, 3)
  classifier = folder_metric.load_or_train_classifier(data, cache)
  assert classifier.trained and classifier.metadata["held_out_accuracy"] >= 0.9
  table = folder_metric.sanity_table(data, classifier)
  assert ranks_real_blurred_noise(table), {k: m["fd"] for k, m in table.items()}
  # Deterministic: trained twice from nothing (for fewer steps), the same weights.
  short = dict(folder_metric.settings_for(data), train_steps=100)
  digests = {folder_metric.train_classifier(data, short).metadata["weights_sha256"]
             for _ in range(2)}
  assert len(digests) == 1
  # The cache returns the first one.
  cached = folder_metric.load_or_train_classifier(data, cache)
  assert cached.metadata["weights_sha256"] == classifier.metadata["weights_sha256"]
  assert os.listdir(cache) == [os.path.basename(folder_metric.classifier_path(
      folder_metric.settings_for(data), cache))]


def test_evaluate_measures_against_the_held_out_split(shapes, monkeypatch):
  data_dir, cache = shapes
  monkeypatch.setenv("MULTISTEP_CM_CACHE", cache)
  config = config_of("folder:shapes", data_dir)
  metric = report.build_metric(config, ["auto"])  # evaluate's --metric=auto
  assert metric.kind == "folder" and metric.primary == "fd" and "trained on" in (
      metric.description)
  data = folder_metric.load_data("folder:shapes", data_dir)
  # The held-out split against itself is at distance 0; the training split is not.
  same = metric(data.held_out, data.held_out_labels)
  assert abs(same["fd"]) < 1e-6 and same["accuracy"] >= 0.9
  assert metric(data.train, data.train_labels)["fd"] > 1e-3
  # The other way round from the labels: a classifier that is right is told apart.
  assert metric(data.held_out, 1 - data.held_out_labels)["accuracy"] <= 0.1


def test_an_unlabelled_folder_uses_untrained_features_and_says_so(shapes):
  data_dir, cache = shapes
  data = folder_metric.load_data("folder:flat", data_dir)
  assert data.num_classes == 0 and data.train_labels is None
  classifier = folder_metric.load_or_train_classifier(data, cache)
  assert not classifier.trained and "untrained" in folder_metric.describe(classifier)
  table = folder_metric.sanity_table(data, classifier)
  assert ranks_real_blurred_noise(table), {k: m["fd"] for k, m in table.items()}
  assert all("accuracy" not in m for m in table.values())


def test_a_folder_without_a_held_out_split_is_refused_in_one_line(shapes):
  data_dir, _ = shapes
  with pytest.raises(runs.InputError, match=r"--metric=folder: folder:no_holdout has no "
                     r"held-out split 'validation'.*--holdout"):
    report.build_metric(config_of("folder:no_holdout", data_dir), "folder")
  with pytest.raises(runs.InputError, match="not prepared"):
    report.build_metric(config_of("folder:nothing", data_dir), "folder")
  assert "folder" in sample_metrics.KINDS


def test_the_sanity_command_prints_the_table(shapes):
  data_dir, cache = shapes
  proc = subprocess.run([sys.executable, "-m", "multistep_cm.evaluation.folder_metric",
                         "--dataset=folder:shapes", f"--data_dir={data_dir}", "--sanity",
                         f"--cache_dir={cache}"], cwd=REPO, capture_output=True, text=True,
                        env=child_env(devices=None), timeout=300, check=True)
  assert "training the folder classifier" not in proc.stdout  # the cached one
  rows = {line[:34].strip(): float(line[34:45]) for line in proc.stdout.splitlines()
          if line.startswith(("real", "binomial", "gaussian", "uniform"))}
  assert len(rows) == 4 and ranks_real_blurred_noise({k: {"fd": v} for k, v in rows.items()})
