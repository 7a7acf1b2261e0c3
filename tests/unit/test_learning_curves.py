"""Learning curves of staged comparison runs (evaluation/learning_curves.py): where each student's
points stand on the compute axis, the seeds' mean and band, the flattening test, and the CLI."""
import json
import os
import subprocess
import sys

import pytest

from multistep_cm.evaluation import learning_curves
from multistep_cm.runtime import metric_log
from tests.helpers import REPO, file_config


def _stage(run, name, mode, steps, train_steps, fd_by_step, solver="addim"):
  path = os.path.join(run, name)
  os.makedirs(path)
  with open(os.path.join(path, "config.json"), "w") as f:
    json.dump({"loss": {"mode": mode, "student_steps": steps, "teacher_solver": solver},
               "num_train_steps": train_steps}, f)
  writer = metric_log.create_writer(path)
  for step, fd in fd_by_step.items():
    writer.write_scalars(step, {"eval/fd": fd, "loss": 1.0})
  writer.close()


@pytest.fixture(scope="module")
def two_seeds(tmp_path_factory):
  root = tmp_path_factory.mktemp("curves")
  runs = []
  for seed, shift in ((0, 0.0), (1, 2.0)):
    run = str(root / f"seed{seed}")
    os.makedirs(run)
    _stage(run, "teacher", "diffusion", 0, 40, {40: 99.0})  # not a student: no points
    _stage(run, "pd2", "pd", 2, 100, {100: 30.0 + shift})
    _stage(run, "pd1", "pd", 1, 100, {100: 40.0 + shift})
    _stage(run, "cd1", "cd", 1, 400, {100: 80.0 + shift, 200: 50.0 + shift, 400: 49.0 + shift})
    _stage(run, "cd1d", "cd", 1, 200, {100: 90.0, 200: 60.0}, solver="ddim")
    runs.append(run)
  return runs


def test_points_stand_at_the_training_compute_of_their_chain(two_seeds):
  points = learning_curves.run_points(two_seeds[0])
  where = sorted((p.method, p.steps, p.step, p.value) for p in points)
  # pd1 follows the 100-step halving to 2 steps: its one evaluation stands at 100 + 100.
  assert ("pd", 1, 200, 40.0) in where and ("pd", 2, 100, 30.0) in where
  assert [w for w in where if w[0] == "cd"] == [("cd", 1, 100, 80.0), ("cd", 1, 200, 50.0),
                                                ("cd", 1, 400, 49.0)]
  assert ("cd/ddim", 1, 200, 60.0) in where
  assert not [w for w in where if w[0] == "diffusion"]


def test_seeds_give_the_mean_band_and_flattening(two_seeds):
  curve = learning_curves.curves([p for r in two_seeds for p in learning_curves.run_points(r)])
  assert curve[("cd", 1)] == [(100, 81.0, 80.0, 82.0, 2), (200, 51.0, 50.0, 52.0, 2),
                              (400, 50.0, 49.0, 51.0, 2)]
  rows = {(r["method"], r["steps"]): r for r in learning_curves.summary(curve, 2)}
  cd = rows[("cd", 1)]
  # The last doubling (200 -> 400) moved the mean by 1, less than the seeds' spread of 2.
  assert (cd["step"], cd["half_step"], cd["change_last_doubling"], cd["spread"]) == (
      400, 200, -1.0, 2.0)
  assert cd["flattened"] is True
  ddim = rows[("cd/ddim", 1)]  # both seeds equal: spread 0, and 100 -> 200 moved it by 30
  assert ddim["flattened"] is False and ddim["spread"] == 0.0
  assert rows[("pd", 1)]["change_last_doubling"] is None  # one point: nothing to compare
  table = learning_curves.equal_compute_markdown(curve, "fd")
  assert "| 1 | 200 | 41.0 (40.0 – 42.0) | cd 51.0 (50.0 – 52.0); cd/ddim 60.0 (60.0 – 60.0) |" in table
  assert "| 2 | 100 | 31.0 (30.0 – 32.0) | – |" in table
  # A PD point between two CD evaluations meets CD's last one before it.
  late = learning_curves.curves([learning_curves.Point("a", "pd", 1, 300, 7.0),
                                 *learning_curves.run_points(two_seeds[0])])
  assert "| 1 | 300 | 7.00 (7.00 – 7.00) | cd at 200 50.0 (50.0 – 50.0)" in (
      learning_curves.equal_compute_markdown(late, "fd"))


def test_a_seeds_parts_in_two_runs_are_one_seed_and_may_not_repeat_a_curve(two_seeds, tmp_path):
  part = str(tmp_path / "more" / "seed0")  # seed 0's S = 4 student, trained by another command
  os.makedirs(part)
  _stage(part, "cd4", "cd", 4, 200, {100: 20.0, 200: 10.0})
  points, seeds = learning_curves.gather([*two_seeds, part])
  assert seeds == ["seed0", "seed1"]
  curve = learning_curves.curves(points)
  assert curve[("cd", 4)] == [(100, 20.0, 20.0, 20.0, 1), (200, 10.0, 10.0, 10.0, 1)]
  assert curve[("cd", 1)][-1] == (400, 50.0, 49.0, 51.0, 2)  # seed 0's own curve is unchanged
  twice = str(tmp_path / "again" / "seed0")
  os.makedirs(twice)
  _stage(twice, "cd1", "cd", 1, 400, {400: 1.0})
  with pytest.raises(ValueError, match=f"{two_seeds[0]} and {twice} both hold seed seed0's cd "
                                       "student of S = 1"):
    learning_curves.gather([*two_seeds, twice])


def test_the_command_writes_figure_table_and_record(two_seeds, tmp_path):
  out = str(tmp_path / "fd")
  proc = subprocess.run([sys.executable, "-m", "multistep_cm.evaluation.learning_curves",
                         f"--runs={','.join(two_seeds)}", f"--out={out}"],
                        capture_output=True, text=True, cwd=REPO, check=True)
  assert "| cd | 1 | 400 | 50.0 (49.0 – 51.0) | 2 |" in proc.stdout
  record = json.load(open(out + ".json"))
  assert record["curves"]["pd 1"] == [[200, 41.0, 40.0, 42.0, 2]]
  assert record["command"] == ("python -m multistep_cm.evaluation.learning_curves "
                               f"--runs={','.join(two_seeds)} --out={out}")
  assert os.path.getsize(out + ".png") > 0 and open(out + ".md").read() in proc.stdout
  missing = subprocess.run([sys.executable, "-m", "multistep_cm.evaluation.learning_curves",
                            f"--runs={tmp_path / 'nope'}"], capture_output=True, text=True,
                           cwd=REPO)
  assert missing.returncode == 2
  assert missing.stderr.strip().splitlines()[-1] == (
      f"learning_curves: error: --runs: {tmp_path / 'nope'} is not a directory")


def test_the_table3_config_builds_the_chain_and_the_students():
  config = file_config("configs/digits_table3.py:teacher=/t,seed=2,steps=1/4,budget=800,"
                       "halving=100,start=8")
  assert config.stage_order == ("pd4", "pd2", "pd1", "cd1", "cd4")
  for name in config.stage_order:
    stage = config.stages[name]
    assert stage.seed == 2 and stage.batch_size == 64 and stage.evals.num_samples == 2000
  assert [config.stages[n].num_train_steps for n in config.stage_order] == [100] * 3 + [800] * 2
  assert config.stages.pd4.teacher_checkpoint == "/t" and config.stages.pd2.init_from == "stage:pd4"
  assert config.stages.cd4.loss.anneal_steps == 400 and config.stages.cd4.evals.every_steps == 500
  assert file_config("configs/digits_table3.py:modes=cd").stage_order[0] == "teacher"
  assert file_config("configs/digits_table3.py:teacher=/t,solver=ddim,modes=cd").stages.cd8.loss.teacher_solver == "ddim"
