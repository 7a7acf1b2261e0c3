"""Configs for your own images (config/base.py: folder_config, configs/folder_pipeline.py).

The example folder of docs/examples/make_shapes.py is written and prepared here; the
configs must take its size, channels and classes from what was prepared (not from the
digits' defaults they start from), and pass the config checks; a dataset that is not
prepared is refused in one line with the command that prepares it.
"""
import os
import subprocess
import sys

import ml_collections
import pytest

from multistep_cm.config import base as config_base
from multistep_cm.config import checks as config_checks
from multistep_cm.config import plan as plan_lib
from multistep_cm.data import image_folder
from helpers import file_config
from helpers import REPO
import test_plan


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
  root = tmp_path_factory.mktemp("shapes")
  subprocess.run([sys.executable, os.path.join(REPO, "docs", "examples", "make_shapes.py"),
                  f"--out={root / 'images'}", "--num=24", "--size=32"], check=True,
                 capture_output=True)
  image_folder.build(str(root / "images"), "shapes", str(root / "tfds"), image_size=16,
                     holdout=4, progress=False)
  return str(root / "tfds")


def test_a_folder_config_takes_the_data_shape_from_the_prepared_dataset(data_dir):
  config = config_base.folder_config("diffusion", "shapes", data_dir)
  assert (config.data.image_size, config.data.num_channels, config.data.num_classes) == (
      16, 3, 2)
  assert config.data.dataset == "folder:shapes" and config.model.preset == "digits16"
  config_checks.validate(config, num_devices=8, num_processes=1)
  pipeline = file_config(f"configs/folder_pipeline.py:name=shapes,data_dir={data_dir},steps=2")
  config_checks.validate_run(pipeline, num_devices=8, num_processes=1)
  student = pipeline.stages.cd2
  assert (student.loss.student_steps, student.teacher_checkpoint) == (2, "stage:teacher")
  assert student.data.num_channels == 3
  for name in pipeline.stage_order:  # as test_plan.py checks every other config file
    stage = ml_collections.ConfigDict(pipeline.stages[name].to_dict())
    plan = plan_lib.RunPlan.from_config(stage)
    assert plan_lib.RunPlan.from_run(*test_plan.as_written(plan)) == plan, name


def test_a_folder_that_is_not_prepared_is_one_line_with_the_command(tmp_path):
  with pytest.raises(ValueError) as info:
    config_base.folder_config("diffusion", "nothing_here", str(tmp_path))
  message = str(info.value)
  assert "\n" not in message and "python -m multistep_cm.data.prepare --images=" in message
  with pytest.raises(ValueError, match="name the prepared dataset"):
    file_config("configs/folder_pipeline.py")


def test_evaluation_during_training_without_fid_weights_is_refused_before_compiling(data_dir,
                                                                                    tmp_path):
  config = config_base.folder_config("diffusion", "shapes", data_dir)
  config.evals.every_steps = 100
  config_checks.validate(config, num_devices=8, num_processes=1)  # 'auto': the folder metric
  config.data.dataset = "tfds:my_images"  # data without a metric of its own: 'auto' is FID
  for unset, fragment in (("inception_weights", "needs config.evals.inception_weights"),
                          ("reference_stats", "needs config.evals.reference_stats")):
    if unset == "reference_stats":
      config.evals.inception_weights = str(tmp_path / "inception_fid.npz")
      (tmp_path / "inception_fid.npz").write_bytes(b"")
    with pytest.raises(config_checks.ConfigError) as info:
      config_checks.validate(config, num_devices=8, num_processes=1)
    message = str(info.value)
    assert fragment in message and "metric='auto' is FID for data.dataset='tfds:my_images'" in (
        message), message
    assert "python -m multistep_cm.evaluation." in message and "\n" not in message
  config.evals.reference_stats = str(tmp_path / "missing.npz")
  with pytest.raises(config_checks.ConfigError, match="reference_stats=.* does not exist"):
    config_checks.validate(config, num_devices=8, num_processes=1)
  config.evals.metric = "none"  # grids and costs only: nothing to convert
  config_checks.validate(config, num_devices=8, num_processes=1)
