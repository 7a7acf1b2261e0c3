"""Training and the benchmarks start where TensorFlow is missing (a GPU image with JAX
alone): TensorFlow is needed only to read TFDS data, and TensorBoard events are then
written by tensorboardX, which TensorBoard's own reader reads."""
import math
import os
import subprocess
import sys

from helpers import child_env
from helpers import main_args
from helpers import read_scalars
from helpers import REPO
from helpers import run_module


def test_the_trainer_imports_without_tensorflow():
  """The trainer imports with TensorFlow blocked, and so do the other modules a GPU run imports."""
  code = ("import sys; sys.modules['tensorflow'] = None; "
          "sys.modules['tensorflow_datasets'] = None; import multistep_cm.training.loop, "
          "multistep_cm.training.step, multistep_cm.sampling.runs, multistep_cm.compile_report, "
          "benchmarks.train_step, benchmarks.sampling; print('imported')")
  proc = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=child_env(),
                        capture_output=True, text=True, timeout=300)
  assert proc.returncode == 0 and "imported" in proc.stdout, proc.stderr[-3000:]


def test_digits_job_without_tensorflow_writes_events_tensorboard_reads(tmp_path):
  workdir = tmp_path / "digits"
  overrides = {"num_train_steps": 20, "batch_size": 16, "log_every_steps": 10,
               "sample_every_steps": 20, "sample_num": 4, "sample_steps": 2,
               "checkpoint_every_steps": 20, "mesh.data": 2, "mesh.fsdp": 4}
  proc = run_module("without_tensorflow", "multistep_cm.main",
                    *main_args("configs/digits_diffusion.py", workdir, overrides))
  assert "TensorFlow is not installed" in proc.stderr
  scalars, images = read_scalars(workdir)
  for tag in ("loss", "grad_norm", "learning_rate", "steps_per_sec", "tflops_per_device"):
    assert [step for step, _ in scalars[tag]] == [10, 20], (tag, scalars.get(tag))
  assert all(math.isfinite(value) for _, value in scalars["loss"])
  assert "samples" in images, images
  assert os.path.exists(workdir / "samples_step20.png")


def test_train_step_benchmark_runs_without_tensorflow():
  proc = run_module("without_tensorflow", "benchmarks.train_step", "--batch=8",
                    "--modes=diffusion", "--repeats=1", "--warmup=1", "--matmul_size=64")
  assert '"step_seconds"' in proc.stdout and '"mfu"' in proc.stdout
