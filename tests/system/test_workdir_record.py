"""The workdir's record: `config.json` written only once a run is known to start (a refused
run leaves the workdir's files byte-identical, a new workdir without one), replayed by
`--config=<workdir>/config.json`, and each resume that changes the config recorded in
`config_history.json` and the log, or refused when the change makes the checkpoints wrong.
"""
import hashlib
import json
import os
import shutil

import jax
import numpy as np
import pytest

from multistep_cm.config import checks as config_checks
from multistep_cm.runtime import checkpointing
from multistep_cm.training import loop as train
from multistep_cm.training import step as train_step

from helpers import assert_one_line_error
from helpers import file_config
from helpers import run_main
from helpers import run_module
from helpers import TINY_ANNEAL
from helpers import TINY_MIXTURE

MIXTURE = "configs/mixture_diffusion.py"
DIGITS = "configs/digits_diffusion.py"
TINY_IMAGE = "tests/tiny_image_config.py"
# The tiny mixture run with a constant learning rate: runs of different lengths train alike.
TINY = {**TINY_MIXTURE, "optimizer.schedule": "constant", "checkpoint_every_steps": 0}
# A digits8 teacher trained for 2 steps (about 30 s on a CPU, the compile).
TINY_DIGITS = {"num_train_steps": 2, "batch_size": 16, "sample_every_steps": 0,
               "log_every_steps": 1, "mesh.data": 2, "mesh.fsdp": 4}


def file_hashes(root) -> dict[str, str]:
  """`{relative path: sha1}` of every file under `root`."""
  out = {}
  for folder, _, files in os.walk(root):
    for name in files:
      path = os.path.join(folder, name)
      with open(path, "rb") as fh:
        out[os.path.relpath(path, root)] = hashlib.sha1(fh.read()).hexdigest()
  return out


def final_params(workdir, config):
  """The parameters of the workdir's latest checkpoint, as numpy arrays."""
  abstract = train_step.StepBuilder.from_config(config).layout.abstract
  ckpt = checkpointing.Checkpointer(checkpointing.checkpoint_dir(str(workdir)), read_only=True,
                                    async_save=False)
  try:
    state, _ = ckpt.restore_state(ckpt.latest_step(), abstract)
  finally:
    ckpt.close()
  return int(state.step), [np.asarray(x) for x in jax.tree.leaves(state.params)]


# --- (a) a refused run writes nothing ---------------------------------------------------------


def test_a_refused_resume_leaves_the_workdir_byte_identical_and_it_still_samples(tmp_path):
  """The issue's case: the digits16 config on a digits8 workdir is refused in one line
  (exit 2, before anything compiles) and every file of the workdir is as it was, so
  `sample` still reads the digits8 run."""
  workdir = tmp_path / "digits8"
  run_main(DIGITS, workdir, TINY_DIGITS)
  before = file_hashes(workdir)
  assert "config.json" in before
  proc = run_main(f"{DIGITS}:size=16", workdir, TINY_DIGITS, check=False)
  assert_one_line_error(proc, 2, "config.model.preset: 'digits8' -> 'digits16'",
                 "config.data.image_size: 8 -> 16", f"--config={workdir}/config.json")
  assert "Compiled the train step" not in proc.stderr
  assert file_hashes(workdir) == before
  out = tmp_path / "samples.npz"
  run_module("multistep_cm.sample", f"--workdir={workdir}", f"--output={out}",
             "--num_samples=4", "--steps=2", "--progress=false")
  assert np.load(out)["images"].shape == (4, 8, 8, 1)


def test_a_run_refused_in_a_new_workdir_leaves_no_config_json(tmp_path):
  """A missing dataset (exit 3) and a missing teacher (exit 4): no config.json, no events."""
  proc = run_main(TINY_IMAGE, tmp_path / "w", {"data.data_dir": tmp_path / "empty"},
                  check=False)
  assert_one_line_error(proc, 3, "'synthetic_jpeg' is not prepared")
  assert not os.path.exists(tmp_path / "w" / "config.json")

  student = dict(TINY, **TINY_ANNEAL, **{"loss.mode": "cd", "loss.student_steps": 2,
                                         "teacher_checkpoint": str(tmp_path / "no")})
  with pytest.raises(checkpointing.CheckpointError, match="no complete checkpoint"):
    train.train_and_evaluate(file_config(MIXTURE, student), str(tmp_path / "s"))
  assert [n for n in os.listdir(tmp_path / "s") if n != "checkpoints"] == []


def test_a_refused_run_keeps_an_existing_workdirs_files(tmp_path):
  """A resume refused by the dataset probe (exit 3): every file as it was."""
  from multistep_cm.data import synthetic  # pylint: disable=g-import-not-at-top
  data_dir = str(tmp_path / "tfds")
  synthetic.build(data_dir, num_examples=32, size_range=(8, 12))
  workdir = tmp_path / "w"
  run_main(TINY_IMAGE, workdir, {"data.data_dir": data_dir, "num_train_steps": 2},
           devices=1)
  before = file_hashes(workdir)
  proc = run_main(TINY_IMAGE, workdir, {"data.data_dir": tmp_path / "empty",
                                        "num_train_steps": 4}, check=False, devices=1)
  assert_one_line_error(proc, 3, "'synthetic_jpeg' is not prepared")
  assert file_hashes(workdir) == before


# --- (b) replay -------------------------------------------------------------------------------


def test_config_json_replays_the_run_exactly(tmp_path):
  """A run stopped after 4 of 8 steps (cosine learning rate), resumed by `main
  --config=<workdir>/config.json` and nothing else, ends with the parameters of an
  uninterrupted run, and records no change."""
  overrides = dict(TINY_MIXTURE, num_train_steps=8, checkpoint_every_steps=0)
  config = file_config(MIXTURE, overrides)
  workdir, straight = tmp_path / "resumed", tmp_path / "straight"
  train.train_and_evaluate(config, str(workdir), stop_after=4)
  proc = run_main(workdir / "config.json", workdir)
  assert "at step 4." in proc.stderr  # "Resumed from ... at step 4."
  assert not os.path.exists(workdir / "config_history.json")
  train.train_and_evaluate(file_config(MIXTURE, overrides), str(straight))
  step_a, a = final_params(workdir, config)
  step_b, b = final_params(straight, config)
  assert step_a == step_b == 8
  for x, y in zip(a, b):
    np.testing.assert_array_equal(x, y)


def test_config_json_takes_overrides_and_a_bad_path_is_one_line(tmp_path):
  workdir = tmp_path / "w"
  train.train_and_evaluate(file_config(MIXTURE, dict(TINY, num_train_steps=2)), str(workdir))
  proc = run_main(workdir / "config.json", tmp_path / "copy",
                  {"num_train_steps": 3, "data.data_dir": "/unused"})
  written = json.loads((tmp_path / "copy" / "config.json").read_text())
  assert written["num_train_steps"] == 3 and written["data"]["data_dir"] == "/unused"
  assert "over 8 devices" in proc.stderr
  assert "checkpoint_manager.py" not in proc.stderr  # orbax's INFO lines, off by default
  proc = run_main(tmp_path / "none.json", tmp_path / "x", check=False)
  assert_one_line_error(proc, 2, "--config=", "none.json")


# --- (c) resume with a changed config ---------------------------------------------------------


def test_each_resume_that_changes_the_config_is_recorded_and_logged(tmp_path, caplog):
  workdir = str(tmp_path / "w")
  train.train_and_evaluate(file_config(MIXTURE, dict(TINY, num_train_steps=2)), workdir)
  caplog.set_level("INFO")
  changed = dict(TINY, num_train_steps=4, **{"optimizer.learning_rate": 1e-4})
  train.train_and_evaluate(file_config(MIXTURE, changed), workdir)
  for key in ("config.num_train_steps changed: 2 -> 4",
              "config.optimizer.learning_rate changed: 0.001 -> 0.0001"):
    assert f"Starting at step 2 with {key}" in caplog.text, caplog.text[-2000:]
  train.train_and_evaluate(file_config(MIXTURE, dict(changed, num_train_steps=5)), workdir)
  train.train_and_evaluate(file_config(MIXTURE, dict(changed, num_train_steps=5)), workdir)
  history = json.loads(open(os.path.join(workdir, "config_history.json")).read())
  assert [h["step"] for h in history] == [2, 4]  # the last, unchanged, run trained nothing
  assert history[0]["changes"] == {"num_train_steps": [2, 4],
                                   "optimizer.learning_rate": [0.001, 0.0001]}
  assert history[1]["changes"] == {"num_train_steps": [4, 5]}
  assert json.loads(open(os.path.join(workdir, "config.json")).read())["num_train_steps"] == 5


@pytest.fixture(scope="module")
def trained_mixture(tmp_path_factory):
  """A 2-step tiny mixture run, trained once; tests copy it."""
  workdir = str(tmp_path_factory.mktemp("mixture") / "w")
  train.train_and_evaluate(file_config(MIXTURE, dict(TINY, num_train_steps=2)), workdir)
  return workdir


@pytest.mark.parametrize("key,value", [
    ("model.width", 48), ("model.depth", 3), ("schedule.kwargs.logsnr_min", -10.0),
    ("loss.mode", "ct"), ("data.num_classes", 4),
])
def test_a_resume_that_would_make_the_checkpoint_wrong_is_refused(
    trained_mixture, tmp_path, caplog, key, value):
  workdir = str(tmp_path / "w")
  shutil.copytree(trained_mixture, workdir)
  before = file_hashes(workdir)
  changed = dict(TINY, num_train_steps=4, **{key: value},
                 **(TINY_ANNEAL if key == "loss.mode" else {}))
  caplog.set_level("INFO")
  with pytest.raises(config_checks.ConfigError) as error:
    train.train_and_evaluate(file_config(MIXTURE, changed), workdir)
  message = str(error.value)
  assert message.startswith(f"config.{key}: ") and "\n" not in message, message
  assert "num_train_steps" not in message  # only what cannot change is named
  assert "Compiled the train step" not in caplog.text
  assert file_hashes(workdir) == before
