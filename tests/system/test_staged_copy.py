"""A staged root is self-contained: its stages record each other as `stage:<name>`, so a copy
of the root, with the original deleted, samples, resumes and replays a stage from where it
is now.
"""
import json
import shutil

import numpy as np

from multistep_cm.sampling import runs
from multistep_cm.training import loop as train

from helpers import file_config
from helpers import run_main
from helpers import run_module

CONFIG = "tests/tiny_staged_config.py"


def _steps(n):
  """The tiny staged pipeline cut to `n` steps a stage (a checkpoint every step)."""
  return {"stages.teacher.num_train_steps": n, "stages.cd2.num_train_steps": n,
          "stages.teacher.record_example_ids": False, "stages.cd2.record_example_ids": False}


def test_a_copied_staged_root_samples_resumes_and_replays_from_its_new_place(tmp_path):
  original, copy = tmp_path / "original", tmp_path / "copy"
  train.run(file_config(CONFIG, _steps(2)), str(original))
  shutil.copytree(original, copy)
  shutil.rmtree(original)
  record = json.loads((copy / "cd2" / "config.json").read_text())
  assert record["teacher_checkpoint"] == "stage:teacher"
  # What the readers (sample, evaluate) see: the teacher beside the copy's student.
  assert runs.load_config(str(copy / "cd2")).teacher_checkpoint == str(copy / "teacher")

  out = tmp_path / "s.npz"
  proc = run_module("multistep_cm.sample", f"--workdir={copy / 'cd2'}", f"--output={out}",
                    "--num_samples=8", "--progress=false", check=False, timeout=300)
  assert proc.returncode == 0, proc.stderr[-3000:]
  samples = np.load(out)
  assert json.loads(str(samples["metadata"]))["workdir"] == str(copy / "cd2")
  assert np.isfinite(samples["x"]).all()

  # The whole pipeline again, one more step a stage: the teacher resumes, then the student,
  # distilling the copy's teacher; nothing is recorded as changed but the step count.
  proc = run_main(CONFIG, copy, _steps(3), check=False, timeout=600)
  assert proc.returncode == 0, proc.stderr[-3000:]
  history = json.loads((copy / "cd2" / "config_history.json").read_text())
  assert [sorted(h["changes"]) for h in history] == [["num_train_steps"]]
  assert json.loads((copy / "cd2" / "config.json").read_text())["teacher_checkpoint"] == (
      "stage:teacher")

  # One stage replayed from its record, a step further: its teacher is read beside it.
  proc = run_main(copy / "cd2" / "config.json", copy / "cd2", {"num_train_steps": 4},
                  check=False, timeout=600)
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert (copy / "cd2" / "checkpoints" / "4").is_dir()
  assert (copy / "teacher" / "checkpoints" / "3").is_dir()
  assert not original.exists()
