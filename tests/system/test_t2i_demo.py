"""The embedded text-to-image demo end to end: train, sample from prompts, report.

A few steps of configs/digits_t2i.py (a text teacher and a CD student distilled from it at
w = 2) through the main job, then the sampling command with prompt strings and with an
encoder-output .npz, and the demo's report. What is checked is the plumbing of text
conditioning through every command (the maths has its own tests: test_cfg_teacher.py,
test_text_model.py, test_captions.py): prompts reach the model (different prompts give
different samples from the same noise), captions come back beside their samples, and the
report has a row per (model, w).
"""
import json

import numpy as np
import pytest

from helpers import run_main
from helpers import run_module
from multistep_cm.data import captions
from multistep_cm.evaluation import t2i_report
from multistep_cm.sampling import prompts
from multistep_cm.sampling import runs


@pytest.fixture(scope="module")
def demo_run(tmp_path_factory):
  root = tmp_path_factory.mktemp("t2i")
  # Small grids (16 samples; the teacher's at 8 steps) keep the test's compiles cheap.
  run_main("configs/digits_t2i.py:teacher_steps=6,student_steps_train=4,guidance=2", root,
           {"stages.teacher.sample_steps": 8, "stages.teacher.sample_num": 16,
            "stages.cd_w2.sample_num": 16})
  return root


def test_the_staged_run_writes_grids_with_prompts(demo_run):
  for stage in ("teacher", "cd_w2"):
    config = json.loads((demo_run / stage / "config.json").read_text())
    assert config["data"]["dataset"] == "captioned_digits"
    assert list((demo_run / stage).glob("samples_step*.png")), stage
  assert json.loads((demo_run / "cd_w2" / "config.json").read_text())["loss"][
      "guidance_scale"] == 2.0


def test_sample_command_takes_prompt_strings_and_encoder_outputs(demo_run, tmp_path):
  prompts = "a thick wide slanted seven;a thin narrow upright one"
  out = tmp_path / "s.npz"
  run_module("multistep_cm.sample", f"--workdir={demo_run / 'teacher'}", f"--output={out}",
             "--num_samples=4", "--steps=4", "--guidance=1", f"--prompts={prompts}",
             "--progress=false")
  with np.load(out) as f:
    assert list(f["captions"]) == prompts.split(";") * 2
    images = f["images"]
  # Same noise seed, different prompt: the text reaches the network.
  assert not np.array_equal(images[0], images[1])
  assert (tmp_path / "s.png").exists()
  # The same prompts as a user's encoder would write them: the same samples.
  emb, mask = captions.encode(prompts.split(";"))
  npz = tmp_path / "prompts.npz"
  np.savez(npz, text_embedding=emb, text_mask=mask, captions=np.asarray(prompts.split(";")))
  out2 = tmp_path / "s2.npz"
  run_module("multistep_cm.sample", f"--workdir={demo_run / 'teacher'}", f"--output={out2}",
             "--num_samples=4", "--steps=4", "--guidance=1", f"--prompts={npz}",
             "--progress=false")
  with np.load(out2) as f:
    np.testing.assert_array_equal(f["images"], images)


def test_prompts_that_do_not_fit_the_run_are_refused(demo_run):
  config = runs.load_config(str(demo_run / "teacher"))
  with pytest.raises(ValueError, match="purple"):
    prompts.parse("a purple seven", 2, config)
  wrong = config.copy_and_resolve_references()
  wrong.data.text_dim = 32
  with pytest.raises(ValueError, match=r"text_embedding \[N, 8, 32\]"):
    prompts.parse("a seven", 2, wrong)


def test_the_demo_report_has_a_row_per_model_and_scale(demo_run, tmp_path):
  rows, picture = t2i_report.evaluate(str(demo_run), 40, [0.0, 2.0], teacher_steps=4,
                                    grid_prompts=3, grid_cols=2)
  assert [(r["model"], r["guidance"], r["distilled_at"]) for r in rows] == [
      ("teacher", 0.0, None), ("teacher", 2.0, None), ("4-step CD student", 0.0, 2.0)]
  for r in rows:
    assert 0.0 <= r["digit_accuracy"] <= 1.0 and np.isfinite(r["fd"])
  assert r["nfe"] == 4
  assert picture.ndim == 3 and picture.dtype == np.uint8
  assert t2i_report.to_markdown(rows).count("\n") == 2 + len(rows)


def test_evaluate_samples_a_text_run_from_training_captions(demo_run):
  from multistep_cm.evaluation import report  # pylint: disable=g-import-not-at-top
  rows, header = report.evaluate_runs(str(demo_run / "cd_w2"), [], [], 16, 0, "ema0",
                                      batch_size=16)
  assert len(rows) == 1 and rows[0]["nfe"] == 4
  assert 0.0 <= rows[0]["prompt_accuracy"] <= 1.0 and "prompt" in header["metric"]
