"""The Python interface (multistep_cm/api.py) and the quickstart notebook that uses it.

A tiny version of the README's main job (a digits teacher and a 4-step CD student, a few
steps each, copied from the session's runs of tests/conftest.py); the API must load both, sample what the commands sample
(the same images as `sample` for the same seed), refuse bad arguments naming the argument
(not a command-line flag), and the notebook docs/notebooks/quickstart.py must run on it
from start to end.
"""
import os
import subprocess
import sys

import numpy as np
import pytest

from multistep_cm import api
from helpers import child_env
from helpers import REPO
from helpers import run_module


@pytest.fixture(scope="module")
def root(digits_runs, tmp_path_factory):
  return digits_runs(tmp_path_factory.mktemp("mcm_digits"), "teacher", "cd4")


def test_the_api_samples_what_the_sample_command_samples(root, tmp_path):
  student = api.load(str(root / "cd4"))
  assert student.step_counts == (4,) and student.step == 2
  samples = student.sample(8, seed=3)
  assert samples.images.shape == (8, 8, 8, 1) and samples.images.dtype == np.uint8
  assert samples.grid().dtype == np.uint8
  out = tmp_path / "s.npz"
  run_module("multistep_cm.sample", f"--workdir={root / 'cd4'}", "--num_samples=8",
             "--seed=3", f"--output={out}", "--progress=false", timeout=300)
  written = np.load(out)
  np.testing.assert_array_equal(samples.images, written["images"])
  np.testing.assert_array_equal(samples.labels, written["labels"])


def test_the_api_names_its_arguments(root):
  student = api.load(str(root / "cd4"))
  for call, fragment in (
      (lambda: api.load(str(root / "nope")), "workdir="),
      (lambda: api.load(str(root)), "staged run's root: name one of its stages"),
      (lambda: api.load(str(root / "cd4"), step=7), "checkpoint_step=7"),
      (lambda: api.load(str(root / "cd4"), weights="ema5"), "weights=ema5"),
      (lambda: student.sample(4, steps=2), "steps=2 does not match it (omit steps)"),
      (lambda: student.sample(4, sampler="heun"), "sampler applies to diffusion runs"),
      (lambda: student.sample(0), "num must be a positive integer")):
    with pytest.raises(ValueError) as info:
      call()
    assert fragment in str(info.value) and "--" not in str(info.value), str(info.value)


def test_the_quickstart_notebook_runs(root, tmp_path):
  notebook = os.path.join(REPO, "docs", "notebooks", "quickstart.py")
  env = child_env(devices=8, MCM_WORKDIR=str(root), MCM_OUTPUT=str(tmp_path),
                  MCM_NUM_SAMPLES="64")
  proc = subprocess.run([sys.executable, notebook], env=env, capture_output=True, text=True,
                        timeout=600, check=False)
  assert proc.returncode == 0, proc.stderr[-3000:]
  for name in ("student_4_steps.png", "teacher_64_steps.png", "grids.png"):
    assert (tmp_path / name).stat().st_size > 0, name
  assert "student, 4 steps: fd" in proc.stdout, proc.stdout
