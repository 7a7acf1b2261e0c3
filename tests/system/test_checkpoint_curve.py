"""`evaluate --checkpoints`: every selected checkpoint of a staged root scored, resumably.

The module scores a copy of the session's tiny digits runs (tests/conftest.py): a teacher
with checkpoints of steps 10, 20 and 30 and a 2-step CD student with checkpoints of steps 10
and 20. Each row of the
command's table is compared with the checkpoint sampled and scored directly (runs.load_run
at that step, generation.generate, the digits metric), not with an earlier output.
"""
import glob
import json
import os

import numpy as np
from PIL import Image
import pytest

from multistep_cm.evaluation import checkpoint_curve
from multistep_cm.evaluation import sample_metrics
from multistep_cm.sampling import generation
from multistep_cm.sampling import runs

from helpers import read_scalars
from helpers import run_module

NUM, BATCH = 24, 16
CURVE = ["--steps=2", "--samplers=ddim", f"--num_samples={NUM}", f"--batch_size={BATCH}"]


@pytest.fixture(scope="module")
def root(digits_runs, tmp_path_factory):
  return digits_runs(tmp_path_factory.mktemp("curve"), "teacher", "cd2")


def direct(run_dir, step):
  """The row's numbers computed without the command: the checkpoint of `step` sampled at 2
  steps (the teacher with DDIM, the student with its own sampler) and scored."""
  run = runs.load_run(run_dir, "ema0", step=step)
  assert run.step == step
  spec = (generation.SamplerSpec("ddim", 2) if run.mode == "diffusion"
          else run.sampler_spec(2))
  samples, labels = generation.generate(run.model, run.params, run.schedule, spec, NUM, seed=0,
                                        batch_size=BATCH)
  return sample_metrics.make_metric(run.config, "auto")(samples, labels)


def evaluate(*args, check=True):
  return run_module("multistep_cm.evaluate", *args, check=check, timeout=600)


def test_selection_of_checkpoints():
  parse = checkpoint_curve.parse_selection
  steps = [10, 20, 30, 35]
  assert checkpoint_curve.select_steps(parse("all"), steps, "r") == steps
  assert checkpoint_curve.select_steps(parse("every:20"), steps, "r") == [20, 35]
  assert checkpoint_curve.select_steps(parse("every:10"), steps, "r") == [10, 20, 30, 35]
  assert checkpoint_curve.select_steps(parse("30, 10"), steps, "r") == [10, 30]
  with pytest.raises(runs.InputError, match=r"step 15; its checkpoints are of steps "
                     r"\[10, 20, 30, 35\]"):
    checkpoint_curve.select_steps(parse("10,15"), steps, "r")
  for bad in ("every:0", "every:-2", "every:x", "", "10,a", "last"):
    with pytest.raises(runs.InputError, match="--checkpoints="):
      parse(bad)


def test_curve_rows_are_each_checkpoint_scored_alone_and_resume(root):
  teacher_events = glob.glob(str(root / "teacher" / "events.out.tfevents.*"))
  prefix = root / "eval_checkpoints" / "ema0"
  proc = evaluate(f"--workdir={root}", "--checkpoints=all", *CURVE)
  assert "scored 5 new row(s)" in proc.stdout, proc.stdout
  with open(f"{prefix}.json") as fh:
    record = json.load(fh)
  rows = {(r["run"], r["checkpoint_step"]): r for r in record["rows"]}
  assert sorted(rows) == [("cd2", 10), ("cd2", 20), ("teacher", 10), ("teacher", 20),
                          ("teacher", 30)]
  expected = {key: direct(str(root / key[0]), key[1]) for key in rows}
  for key, row in rows.items():
    for name in ("fd", "accuracy", "label_entropy"):
      np.testing.assert_allclose(row[name], expected[key][name], rtol=1e-5, err_msg=str(key))
  # The checkpoints differ, so a curve of one checkpoint's numbers could not pass the above.
  assert expected[("teacher", 10)]["fd"] != expected[("teacher", 30)]["fd"]
  assert Image.open(f"{prefix}.png").size[0] > 100
  assert os.path.exists(f"{prefix}.md")
  # TensorBoard: the numbers on each run's own step axis, beside the trainer's events.
  scalars, _ = read_scalars(str(root / "teacher" / "eval_checkpoints" / "ema0"))
  (tag,) = [t for t in scalars if t.startswith("fd/")]
  assert sorted(scalars[tag]) == [(s, pytest.approx(rows[("teacher", s)]["fd"], rel=1e-6))
                                  for s in (10, 20, 30)]
  student, _ = read_scalars(str(root / "cd2" / "eval_checkpoints" / "ema0"))
  assert [s for s, _ in sorted(student[next(t for t in student if t.startswith("fd/"))])] == [
      10, 20]
  assert glob.glob(str(root / "teacher" / "events.out.tfevents.*")) == teacher_events

  # A second call scores nothing and writes no new event.
  proc = evaluate(f"--workdir={root}", "--checkpoints=all", *CURVE)
  assert "scored 0 new row(s); 5 were already" in proc.stdout, proc.stdout
  with open(f"{prefix}.json") as fh:
    assert json.load(fh)["rows"] == record["rows"]
  assert read_scalars(str(root / "teacher" / "eval_checkpoints" / "ema0"))[0] == scalars

  # A record that lost a row (an interrupted call): every:20 selects the teacher's 20 and
  # 30 (its latest) and the student's 20; only the missing one is sampled.
  with open(f"{prefix}.json", "w") as fh:
    json.dump(dict(record, rows=[r for r in record["rows"]
                                 if (r["run"], r["checkpoint_step"]) != ("teacher", 20)]), fh)
  proc = evaluate(f"--workdir={root}", "--checkpoints=every:20", *CURVE)
  assert "scored 1 new row(s); 4 were already" in proc.stdout, proc.stdout
  with open(f"{prefix}.json") as fh:
    again = {(r["run"], r["checkpoint_step"]): r for r in json.load(fh)["rows"]}
  assert sorted(again) == sorted(rows)
  np.testing.assert_allclose(again[("teacher", 20)]["fd"], expected[("teacher", 20)]["fd"],
                             rtol=1e-5)


@pytest.mark.parametrize("case", ["every:0", "no such step", "a record of other settings"])
def test_bad_inputs_are_one_line_before_sampling(root, tmp_path, case):
  prefix = tmp_path / "curve"
  args, fragments = {
      "every:0": (["--checkpoints=every:0"], ["--checkpoints=every:0", "positive"]),
      # The student lacks the teacher's step 30: the line names its own checkpoints.
      "no such step": (["--checkpoints=10,30"],
                       ["--checkpoints=10,30", "cd2 has no checkpoint of step 30", "[10, 20]"]),
      "a record of other settings": (["--checkpoints=all"], ["--output=", "num_samples 99"]),
  }[case]
  if case == "a record of other settings":
    with open(f"{prefix}.json", "w") as fh:
      json.dump({"header": {"num_samples": 99}, "rows": []}, fh)
  proc = evaluate(f"--workdir={root}", *args, *CURVE, f"--output={prefix}", check=False)
  assert proc.returncode == 2, proc.stderr[-3000:]
  assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
  lines = [l for l in proc.stderr.splitlines() if "error:" in l]
  assert len(lines) == 1 and lines[0].startswith("evaluate: error: "), proc.stderr[-3000:]
  for fragment in fragments:
    assert fragment in lines[0], (fragment, lines[0])
  assert sorted(os.listdir(tmp_path)) == (["curve.json"] if "record" in case else [])
  assert not glob.glob(str(root / "*" / "eval_checkpoints" / "curve"))
