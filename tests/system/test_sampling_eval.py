"""Sampling and evaluation: the sample CLI, sharded generation, the evaluate report, evals.

A copy of the session's tiny digits teacher and 2-step CD student (tests/conftest.py).
"""
import glob
import json
import os

import jax
import numpy as np
from PIL import Image
import pytest

from multistep_cm.config import plan as plan_lib
from multistep_cm.evaluation import in_training
from multistep_cm.evaluation import report
from multistep_cm.runtime import sharding
from multistep_cm.sampling import generation
from multistep_cm.sampling import images
from multistep_cm.sampling import runs

from helpers import read_hparams
from helpers import read_images
from helpers import read_scalars
from helpers import run_module
from helpers import tiny_digits


@pytest.fixture(scope="module")
def trained(digits_runs, tmp_path_factory):
  root = digits_runs(tmp_path_factory.mktemp("runs"), "teacher", "cd2")
  return root, str(root / "teacher"), str(root / "cd2")


def test_generation_does_not_depend_on_the_device_count(trained):
  _, teacher, _ = trained
  run = runs.load_run(teacher)
  spec = generation.SamplerSpec("addim", 3)
  labels = np.arange(24) % 10
  on_8, _ = generation.generate(run.model, run.params, run.schedule, spec, 24, seed=3,
                                batch_size=16, labels=labels)
  mesh_1 = jax.sharding.Mesh(jax.devices()[:1], ("data",))
  params_1 = jax.device_put(run.params, jax.sharding.NamedSharding(
      mesh_1, jax.sharding.PartitionSpec()))
  on_1, _ = generation.generate(run.model, params_1, run.schedule, spec, 24, seed=3,
                                batch_size=16, labels=labels, mesh=mesh_1)
  assert on_8.shape == (24, 8, 8, 1)
  np.testing.assert_allclose(on_8, on_1, rtol=1e-5, atol=1e-5)
  other, _ = generation.generate(run.model, run.params, run.schedule, spec, 24, seed=4,
                                 batch_size=16, labels=labels)
  assert not np.allclose(other, on_8)


def test_sample_cli_writes_images_labels_metadata_and_grid(trained, tmp_path):
  _, _, student = trained
  out = tmp_path / "s.npz"
  proc = run_module("multistep_cm.sample", f"--workdir={student}", "--num_samples=20",
                    "--labels=3,4", f"--output={out}", "--batch_size=16")
  assert "wrote" in proc.stdout
  with np.load(out) as f:
    images, labels, meta = f["images"], f["labels"], json.loads(str(f["metadata"]))
  assert images.shape == (20, 8, 8, 1) and images.dtype == np.uint8
  np.testing.assert_array_equal(labels, [3, 4] * 10)
  assert meta["sampler"].startswith("Multistep CM, 2 steps") and "EMA" in meta["weights"]
  assert meta["checkpoint_step"] == 20
  assert os.path.exists(tmp_path / "s.png")


def test_sample_cli_rejects_a_step_count_the_student_was_not_trained_for(trained, tmp_path):
  _, _, student = trained
  proc = run_module("multistep_cm.sample", f"--workdir={student}", "--steps=4",
                    f"--output={tmp_path / 'x.npz'}", check=False)
  assert proc.returncode != 0 and "2-step Multistep CM" in proc.stderr


def test_sampler_spec_for_diffusion_and_student_runs(trained):
  _, teacher, student = trained
  t_run, s_run = runs.load_run(teacher), runs.load_run(student)
  assert t_run.sampler_spec(16, "addim", "table") == generation.SamplerSpec(
      "addim", 16, "table")
  assert s_run.sampler_spec().steps == 2
  with pytest.raises(ValueError, match="--sampler applies to diffusion"):
    s_run.sampler_spec(0, "ddim")


def test_addim_table_from_data_runs(trained):
  _, teacher, _ = trained
  run = runs.load_run(teacher)
  data, labels = run.training_examples(64, 0)
  table = generation.estimate_table(run.model, run.params, run.schedule, data, labels,
                                    num_points=8)
  values = np.asarray(table.values)
  assert values[0] == 0 and np.all(values >= 0) and np.all(np.isfinite(values))
  out, _ = generation.generate(run.model, run.params, run.schedule,
                               generation.SamplerSpec("addim", 4, "table"), 16,
                               x_var_table=table)
  assert np.all(np.isfinite(out))


def test_evaluate_reports_every_run_with_its_provenance(trained, tmp_path):
  root, _, _ = trained
  rows, header = report.evaluate_runs(str(root), ["2", "4"], ["ddim", "addim"], 40, 0,
                                        "ema0", batch_size=40)
  kinds = [(r["run"], r["sampler"].split(",")[0], r["nfe"]) for r in rows]
  assert kinds == [("cd2", "Multistep CM", 2), ("teacher", "DDIM", 2), ("teacher", "DDIM", 4),
                   ("teacher", "aDDIM", 2), ("teacher", "aDDIM", 4)]
  for r in rows:
    assert np.isfinite(r["fd"]) and 0 <= r["accuracy"] <= 1 and "EMA" in r["weights"]
  markdown = report.to_markdown(rows, header)
  assert "40 samples per row" in markdown and "digits classifier" in markdown
  assert "held-out test split" in markdown and "`ema0`" in markdown


def test_in_training_evals_reach_tensorboard(trained):
  _, _, student = trained
  scalars, _ = read_scalars(student)
  for tag in ("eval/fd", "eval/accuracy", "eval/label_entropy", "eval/ode_error"):
    assert tag in scalars and len(scalars[tag]) == 2, (tag, sorted(scalars))
    assert all(np.isfinite(v) for _, v in scalars[tag])


def test_evals_sample_a_diffusion_run_with_evals_sample_steps():
  """`evals.sample_steps` (0: `sample_steps`) is the in-training sampler's step count."""
  config = tiny_digits("diffusion")
  config.evals.metric = "none"
  mesh = sharding.make_mesh(config.mesh)
  for sample_steps, expected in ((0, config.sample_steps), (3, 3)):
    config.evals.sample_steps = sample_steps
    evaluator = in_training.TrainingEvaluator(plan_lib.RunPlan.from_config(config), mesh)
    assert [(s.kind, s.steps) for s in evaluator.specs] == [(config.sample_sampler, expected)]


def test_tensorboard_reads_the_runs_and_evaluates_outputs(trained, tmp_path):
  """What a person opens `tensorboard --logdir` for, read back with TensorBoard's own reader:
  the student's losses and quality curve (in-training evals), its labelled sample grid and
  hyperparameters, and the quality-vs-NFE figure `evaluate` writes beside its table."""
  root, _, student = trained
  # What `evaluate --steps=1,2 --samplers=ddim` writes beside its table (its module is not
  # imported here: its flags would clash with other modules' in one test process).
  rows, header = report.evaluate_runs(str(root), ["1", "2"], ["ddim"], 40, 0, "ema0",
                                      batch_size=40)
  prefix = str(tmp_path / "eval_ema0")
  report.write_figure(rows, header, prefix)
  scalars, _ = read_scalars(student)
  assert [step for step, _ in scalars["loss"]] == [10, 20]
  assert [step for step, _ in scalars["eval/fd"]] == [10, 20]  # the quality curve
  (step, grid), = [e for e in read_images(student)["samples"] if e[0] == 20]
  # tiny_digits' 4 samples of 8x8 digits: classes 0 and 1, a row each.
  assert grid.shape[:2] == images.grid_layout(4, 8, 8, [0, 0, 1, 1]).shape
  hparams = read_hparams(student)
  assert hparams["loss.mode"] == "cd" and hparams["loss.student_steps"] == 2
  (step, figure), = read_images(prefix)["quality_vs_nfe"]
  assert step == 30  # the latest checkpoint among the rows: the teacher's
  np.testing.assert_array_equal(figure[..., :3],
                                np.asarray(Image.open(prefix + ".png").convert("RGB")))
  assert [(r["run"], r["nfe"]) for r in rows] == [("cd2", 2), ("teacher", 1), ("teacher", 2)]


def test_euler_and_heun_sample_a_trained_teacher(trained, tmp_path):
  """Euler is DDIM (the identity of tests/unit/test_samplers.py) on the real network too; the
  sample command takes Heun on the Karras grid and says so; a student refuses both."""
  _, teacher, student = trained
  run = runs.load_run(teacher)
  draw = lambda spec: generation.generate(run.model, run.params, run.schedule, spec, 16,
                                          seed=1, batch_size=16)[0]
  np.testing.assert_allclose(draw(generation.SamplerSpec("euler", 4)),
                             draw(generation.SamplerSpec("ddim", 4)), atol=2e-3)
  out = tmp_path / "heun.npz"
  run_module("multistep_cm.sample", f"--workdir={teacher}", "--sampler=heun",
             "--spacing=karras", "--steps=3", "--num_samples=16", f"--output={out}",
             "--batch_size=16")
  with np.load(out) as f:
    assert json.loads(str(f["metadata"]))["sampler"] == "Heun, 3 steps, karras spacing"
    assert f["images"].shape == (16, 8, 8, 1)
  with pytest.raises(ValueError, match="--spacing applies to diffusion"):
    runs.load_run(student).sampler_spec(0, None, spacing="karras")


def test_evaluate_rows_state_nfe_for_every_sampler(trained):
  _, teacher, _ = trained
  rows, _ = report.evaluate_runs(teacher, ["2"], ["heun", "addim"], 16, 0, "ema0",
                                 batch_size=16, spacings=["karras"], final_step="addim")
  got = [(r["sampler"], r["steps"], r["nfe"]) for r in rows]
  assert got == [("Heun, 2 steps, karras spacing", 2, 3),
                 ("aDDIM, 2 steps, karras spacing, x_var 0.1/(2+SNR), addim last step", 2, 2)]


def test_evaluate_without_a_metric_writes_costs_and_grids(trained, tmp_path):
  """`--metric=none`: every row's NFE and sampling seconds, a grid of its samples (the
  samples `sample` draws from the same run, step count and seed), no figure."""
  root, _, student = trained
  out = str(tmp_path / "ev")
  run_module("multistep_cm.evaluate", f"--workdir={root}", "--metric=none", "--steps=2",
             "--samplers=ddim", "--num_samples=12", "--batch_size=16", f"--output={out}")
  with open(out + ".json") as fh:
    report_json = json.load(fh)
  rows = report_json["rows"]
  assert [(r["run"], r["nfe"]) for r in rows] == [("cd2", 2), ("teacher", 2)]
  assert all(r["sample_seconds"] > 0 and "fd" not in r for r in rows)
  assert report_json["header"]["primary"] is None
  assert not os.path.exists(out + ".png") and not os.path.exists(out)
  grids = sorted(os.path.basename(p) for p in glob.glob(out + "_*.png"))
  student_grid = "ev_cd2_Multistep_CM_2_steps_DDIM_Algorithm_2.png"
  assert grids == [student_grid, "ev_teacher_DDIM_2_steps.png"], grids
  # The student's grid is the grid of the samples `sample` draws with the same seed.
  run_module("multistep_cm.sample", f"--workdir={student}", "--num_samples=12", "--seed=0",
             "--batch_size=16",
             f"--output={tmp_path / 's.npz'}")
  np.testing.assert_array_equal(np.asarray(Image.open(tmp_path / student_grid)),
                                np.asarray(Image.open(tmp_path / "s.png")))


def test_evaluate_scores_fd_dinov2_and_precision_recall(trained, tmp_path):
  """The feature metrics through the report, with a random-weights DINOv2 and reference
  statistics of the training digits (wiring, not the published network's numbers)."""
  from multistep_cm.data import digits  # pylint: disable=g-import-not-at-top
  from multistep_cm.evaluation import dinov2  # pylint: disable=g-import-not-at-top
  from multistep_cm.evaluation import reference_stats  # pylint: disable=g-import-not-at-top
  from multistep_cm.evaluation import tree_io  # pylint: disable=g-import-not-at-top
  _, _, student = trained
  config = dinov2.Dinov2Config(32, 1, 2, 64, pos_grid=2)
  weights = str(tmp_path / "dinov2.npz")
  variables = dinov2.random_variables(config)
  dinov2.save_dinov2(weights, config, variables)
  train, _ = digits.load_digits("train", 8)
  np.savez(tmp_path / "train.npz", images=images.to_uint8(train[:64]))
  ref = str(tmp_path / "ref.npz")
  reference_stats.main([f"--images_npz={tmp_path / 'train.npz'}", "--features=dinov2",
                        f"--weights={weights}", "--keep_features", f"--output={ref}",
                        "--batch_size=64"])
  rows, header = report.evaluate_runs(student, ["2"], ["ddim"], 24, 0, "ema0",
                                      metric_kind=["fd_dinov2", "prdc"], reference_stats=ref,
                                      dinov2_weights=weights, batch_size=24)
  (row,) = rows
  assert np.isfinite(row["fd_dinov2"]) and row["fd_dinov2"] > 0
  assert all(0 <= row[k] <= 1 for k in ("precision", "recall", "coverage"))
  assert header["primary"] == "fd_dinov2" and "DINOv2" in header["metric"]
  assert tree_io.digest(variables)[:12] in header["metric"] and "64 images" in header["metric"]
  assert "FD-DINOv2, lower is better" in report.quality_figure(rows, header).axes[0].get_ylabel()
