"""The benchmarks run end to end on tiny settings and their reports are self-consistent.

Timings are never asserted (they depend on the machine); what is checked is that
each derived figure is the arithmetic of the measured ones it claims to be.
"""
import importlib.util
import json
import subprocess
import sys

import pytest

from benchmarks import bench_models
from benchmarks import host_overhead
from benchmarks import input_pipeline
from benchmarks import sampling
from benchmarks import tpu_cost_model
from benchmarks import train_step
from multistep_cm.config import build as config_build
from multistep_cm import models
from multistep_cm.models import summary
from multistep_cm.training import step as train_step_lib

from helpers import run_module


def test_train_step_report_is_consistent(tmp_path):
  out = tmp_path / "train_step.json"
  report = train_step.main(["--config", "configs/mixture_cd.py", "--batch", "16",
                            "--modes", "diffusion,cd", "--repeats", "2", "--warmup", "1",
                            "--matmul_size", "64", "--out", str(out)])
  assert json.loads(out.read_text()) == json.loads(json.dumps(report))
  peak = report["peak"]["flops_per_s"]
  for mode in ("diffusion", "cd"):
    r = report["modes"][mode]
    assert r["flops_per_step"] == pytest.approx(r["flops_per_step_per_device"]
                                                * report["machine"]["num_devices"])
    assert r["images_per_s"] == pytest.approx(16 / r["step_seconds"])
    assert r["mfu"] == pytest.approx(r["flops_per_step_per_device"] / r["step_seconds"] / peak)
    assert r["step_seconds_min"] <= r["step_seconds"]
  ratio, cd, diffusion = (report["ratios"]["cd_over_diffusion"], report["modes"]["cd"],
                          report["modes"]["diffusion"])
  assert ratio["wall"] == pytest.approx(cd["step_seconds"] / diffusion["step_seconds"])
  assert ratio["cpu"] == pytest.approx(cd["step_cpu_seconds"] / diffusion["step_cpu_seconds"])
  assert ratio["theory"] == pytest.approx(5 / 3) and train_step.THEORY["ct"] == 4 / 3
  assert ratio["within_target"] == (ratio["wall"] <= ratio["target"])
  # The two extra forwards add FLOPs: more than diffusion, no more than the theory allows.
  assert 1.0 < ratio["flops"] < 5 / 3 + 0.1
  # The FLOPs are the package's one count, the model FLOPs the trainer's logged MFU uses.
  base = summary.load_config("configs/mixture_cd.py")
  for mode in ("diffusion", "cd"):
    count, _ = train_step_lib.StepBuilder.from_config(train_step.mode_config(base, mode, 16, {})).flops()
    assert count.exact and report["modes"][mode]["flops_per_step"] == count.flops
    assert report["modes"][mode]["flops_note"].startswith("exact")


def test_train_step_marks_the_direct_flops_a_lower_bound():
  report = train_step.main(["--config", "configs/mixture_cd.py", "--batch", "16",
                            "--modes", "ct,direct", "--compile_only"])
  assert report["modes"]["direct"]["flops_note"].startswith("lower bound")
  assert report["modes"]["ct"]["flops_note"].startswith("exact")
  assert report["modes"]["direct"]["memory_bytes_per_device"]["peak"] > 0


def test_largest_batch_is_the_last_that_fits():
  found = train_step.largest_batch(lambda batch: 1000 + 10 * batch, start=8, limit=1500)
  assert found["batch"] == 32
  assert sorted(found["peak_bytes_by_batch"]) == [8, 16, 32, 64]
  with pytest.raises(ValueError, match="batch 8"):
    train_step.largest_batch(lambda batch: 2000, start=8, limit=1500)


def test_sampling_report_is_consistent():
  report = sampling.main(["--config", "configs/mixture_cd.py", "--batch", "16",
                          "--steps", "1,3", "--samplers", "mcm", "--repeats", "2",
                          "--warmup", "1"])
  # One forward's FLOPs, as the model summary counts them (runtime/flops.py).
  model = config_build.get_model(summary.load_config("configs/mixture_cd.py"))
  assert report["forward_flops"] == summary.forward_flops(model, 16) > 0
  for name, steps in (("mcm_1", 1), ("mcm_3", 3)):
    case = report["cases"][name]
    assert case["steps"] == steps
    assert case["ratio"] == pytest.approx(case["sample_seconds"] / case["forwards_seconds"])
    assert case["ratio_vs_k_single_forwards"] == pytest.approx(
        case["sample_seconds"] / (steps * report["forward_seconds"]))
    assert case["within_target"] == (case["ratio"] <= case["target"])


def test_host_overhead_report_is_consistent():
  report = host_overhead.main(["--config", "configs/mixture_diffusion.py", "--batch", "64",
                               "--steps", "3", "--rounds", "1", "--log_every", "2"])
  assert report["host_fraction"] == pytest.approx(report["host_seconds"] /
                                                  report["step_seconds"])
  assert report["loop_overhead_fraction"] == pytest.approx(
      1 - report["step_seconds"] / report["loop_step_seconds"])
  assert report["within_target"] == (report["host_fraction"] < report["target"])
  parts = report["host_wall_seconds_by_part"]
  assert set(parts) == {"next_batch", "to_global", "dispatch"}


def test_input_pipeline_measures_and_derives_consumption(tmp_path):
  report = input_pipeline.main(["--data_dir", str(tmp_path), "--num_examples", "16",
                                "--batch_size", "8", "--num_steps", "1", "--sizes", "64",
                                "--num_threads", "1", "--flops_modes", ""])
  rate = report["measured"]["64"]["exact"]["images_per_cpu_s"]
  assert rate > 0 and "fast_decode" in report["measured"]["64"]
  rows = input_pipeline.consumption({64: {"diffusion": 1e12, "cd": 5e12 / 3}},
                                    report["measured"])
  paper_cd = next(r for r in rows if r["basis"] == "paper" and r["mode"] == "cd")
  assert paper_cd["images_per_s_per_chip"] == pytest.approx(2.5 * 2048 / 64)
  # 2.5 steps/s x 2048 images x 5/3 TFLOP over 64 chips x 197 TFLOP/s.
  assert paper_cd["implied_mfu"] == pytest.approx(2.5 * 2048 * 5e12 / 3 / (64 * 197e12))
  bound = next(r for r in rows if r["basis"] == "100% MFU" and r["device"] == "NVIDIA H200"
               and r["mode"] == "diffusion")
  assert bound["images_per_s_per_chip"] == pytest.approx(989e12 / 1e12)
  for row in rows:
    assert row["margin"] == pytest.approx(rate / row["images_per_s_per_core"])



def test_bench_models_preset_is_consistent():
  result = bench_models.bench_preset("mlp_toy", batch=4, repeats=2, peak=1e9)
  fwd, fwd_bwd = result["forward"], result["forward_backward"]
  # The forward's FLOPs as the model summary counts them; the backward adds about two forwards.
  assert fwd["flops"] == summary.forward_flops(models.get_model("mlp_toy"), 4) > 0
  assert 2.5 < fwd_bwd["flops"] / fwd["flops"] <= 3.0
  for r in (fwd, fwd_bwd):
    assert r["flops_per_s"] == pytest.approx(r["flops"] / r["seconds"])
    assert r["fraction_of_matmul"] == pytest.approx(r["flops_per_s"] / 1e9)


def test_device_check_dry_run_lists_the_plan_and_names_what_is_missing():
  from helpers import child_env, REPO, run_module  # pylint: disable=g-import-not-at-top
  proc = run_module("benchmarks.device_check", "--dry-run", devices=1)
  assert "plan:" in proc.stdout and "cd/no_remat/xla" in proc.stdout, proc.stdout
  assert "not a GPU" in proc.stdout  # this machine has none
  code = ("import sys; sys.modules['ml_collections'] = None; sys.modules['tqdm'] = None; "
          "from benchmarks import device_check; sys.exit(device_check.main(['--dry-run']))")
  proc = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=child_env(devices=1),
                        capture_output=True, text=True, timeout=300)
  assert proc.returncode == 2, proc.stderr
  assert proc.stderr.count("\n") == 1 and "ml_collections, tqdm" in proc.stderr, proc.stderr


def test_device_check_runs_its_plan_within_the_budget(tmp_path):
  """On the CPU with a spent budget: the peak and the batch probe run, every variant and
  the sampling are listed as skipped, and the report and table still come out."""
  from benchmarks import device_check  # pylint: disable=g-import-not-at-top
  args = ["--allow_cpu", "--config=configs/digits_cd.py", "--budget_s=0", "--reserve_s=0",
          "--matmul_size=64", "--probe_batch=8", "--memory_limit_gb=0.05", "--repeats=1",
          f"--out={tmp_path}"]
  assert device_check.main(args) == 0
  report = json.loads((tmp_path / "device_check.json").read_text())
  probe = report["batch_probe"]["memory_bytes"]
  fixed = probe["argument"] + probe["output"] - probe["alias"]
  expected = int((0.9 * 0.05 * 2**30 - fixed) / (probe["temp"] / 8)) // 8 * 8
  assert report["batch"] == max(8, expected)
  assert not report["steps"]
  assert len(report["skipped"]) == len(device_check.variants()) + 1  # + the sampling
  assert report["skipped"][0] == "cd/no_remat/xla" and report["skipped"][-1] == "sampling"


def test_tpu_cost_model_sums_the_compilers_cycle_estimates():
  text = ('HloModule m\n%body { %a = f32[2] fusion(), backend_config={"estimated_cycles":"7"} }\n'
          'ENTRY %main {\n  %f = f32[2] fusion(), backend_config={"estimated_cycles":"100",'
          '"cost_model_type":"COST_MODEL_TYPE_CLASSIC"}\n  %c = f32[2] copy(%f), backend_config='
          '{"estimated_cycles":"20","cost_model_type":"COST_MODEL_TYPE_INVALID"}\n}\n')
  assert tpu_cost_model.estimated_cycles(text) == {"cycles": 120, "instructions": 2,
                                                   "invalid": 1, "while_loops": 0}


@pytest.mark.skipif(importlib.util.find_spec("libtpu") is None,
                    reason="compiling for a TPU topology needs libtpu: pip install -e '.[tpu]'")
def test_tpu_cost_model_of_a_matmul_is_below_the_chips_peak(tmp_path):
  out = tmp_path / "cost.json"
  run_module("benchmarks.tpu_cost_model", "--cases=matmul", f"--out={out}", devices=None,
             timeout=300)
  r = json.loads(out.read_text())
  (row,) = r["cases"]
  assert row["jaxpr_flops"] == row["xla_flops"] == 2 * 8192**3
  assert row["instructions"] >= 1 and row["while_loops"] == 0
  # No estimate may beat the chip's peak; a large matmul should come near it.
  assert 0.5 < row["cycles_fraction_of_peak"] <= 1.0
  assert row["xla_optimal_seconds"] >= row["jaxpr_flops"] / r["peak_flops"] * 0.999
