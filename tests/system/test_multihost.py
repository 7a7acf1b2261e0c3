"""Multi-host training equals single-host training: 2 processes x 4 CPU devices vs 1 x 8.

The main job runs as real OS processes that find each other through
`jax.distributed` on localhost; XLA's CPU collectives across processes go through
gloo. Each run distils the same diffusion teacher (mixture CD: every process loads
its shards of the teacher and of the student's initial weights from one checkpoint)
with the same config (2x4 mesh, same seed), and the test compares:
  * every logged training scalar, step by step, and every array of the final
    checkpoint (parameters, EMA, optimiser state): bitwise, against a 1 x 8 run
    that also starts `jax.distributed` (one process), so that its all-reduces take
    the same gloo code path and hence sum in the same order;
  * the same against a plain 1 x 8 run without `jax.distributed` (XLA's in-process
    CPU all-reduce, which sums the 8 devices' partial sums in another order), to
    float32 rounding;
  * the input: each process fed exactly its own half of every global batch.
"""
import os
import time

import jax
import numpy as np
import pytest

from multistep_cm.runtime import checkpointing
from multistep_cm.training import loop as train
from multistep_cm.training import step as train_step

from helpers import file_config
from helpers import free_port
from helpers import main_args
from helpers import popen_module
from helpers import read_scalars
from helpers import TINY_ANNEAL
from helpers import TINY_MIXTURE

TIMEOUT_S = 300

# Mixture CD (the MLP denoiser) on a 2x4 mesh: FSDP-sharded parameters, batch split
# over all 8 devices, a checkpoint mid-run and at the end.
CONFIG = "configs/mixture_cd.py"
OVERRIDES = {
    **TINY_MIXTURE, **TINY_ANNEAL, "num_train_steps": 20, "log_every_steps": 5,
    "checkpoint_every_steps": 10, "loss.student_steps": 2, "loss.anneal_steps": 10,
}
# Wall-clock rates differ from run to run; everything else logged must not.
TIMING_TAGS = ("steps_per_sec", "examples_per_sec", "tflops_per_device", "mfu", "uptime")


def _config(teacher: str):
  return file_config(f"{CONFIG}:teacher={teacher}", OVERRIDES)


class MainJob:
  """The main job as `num_processes` OS processes on one coordinator (`with` starts them).

  `wait()` returns once all exited 0. A process that fails, or outlives TIMEOUT_S, gets
  the others killed (they would wait for it in a collective forever), and the error
  names each process's exit code and the end of its log; leaving the `with` block
  early (an exception elsewhere) kills them too.
  """

  def __init__(self, workdir, teacher, num_processes: int, devices_per_process: int,
               record_dir):
    self.args = main_args(f"{CONFIG}:teacher={teacher}", workdir, OVERRIDES,
                          f"--coordinator_address=localhost:{free_port()}",
                          f"--num_processes={num_processes}")
    self.num_processes, self.devices = num_processes, devices_per_process
    self.record_dir = record_dir
    self.procs, self.logs = [], []

  def __enter__(self):
    self.deadline = time.monotonic() + TIMEOUT_S
    for i in range(self.num_processes):
      self.logs.append(open(os.path.join(self.record_dir, f"process_{i}.log"), "w+"))
      # tests/multihost_worker.py: the main job, recording the example ids it feeds.
      self.procs.append(popen_module(
          "multihost_worker", *self.args, f"--process_id={i}", log=self.logs[-1],
          devices=self.devices, env={"MCM_RECORD_DIR": self.record_dir}))
    return self

  def wait(self):
    while any(p.poll() is None for p in self.procs):
      if any(p.poll() not in (None, 0) for p in self.procs) or time.monotonic() > self.deadline:
        break
      time.sleep(0.5)
    self._stop()
    codes = [p.returncode for p in self.procs]
    if any(codes):
      report = []
      for i, log in enumerate(self.logs):
        log.seek(0)
        report.append(f"--- process {i} (exit {codes[i]}) ---\n{log.read()[-3000:]}")
      raise AssertionError(f"{len(codes)} processes, exit codes {codes} (negative: killed "
                           f"after a failure elsewhere or the {TIMEOUT_S}s timeout)\n"
                           + "\n".join(report))

  def _stop(self):
    for p in self.procs:
      if p.poll() is None:
        p.kill()
      p.wait()

  def __exit__(self, *exc):
    self._stop()
    for log in self.logs:
      log.close()


def _restore_state(workdir, builder):
  ckpt, step = checkpointing.resolve(str(workdir))
  state, _ = ckpt.restore_state(step, builder.layout.abstract)
  return step, jax.device_get(state)


def _training_scalars(workdir):
  scalars, _ = read_scalars(str(workdir))
  return {k: v for k, v in scalars.items()
          if k not in TIMING_TAGS and not k.startswith("hparams")}


@pytest.mark.slow
def test_two_processes_equal_one(tmp_path):
  teacher = str(tmp_path / "teacher")
  teacher_config = _config("")
  teacher_config.loss.mode = "diffusion"
  teacher_config.num_train_steps = 10
  train.train_and_evaluate(teacher_config, teacher)  # in this process: 8 devices
  (tmp_path / "two").mkdir()
  (tmp_path / "one").mkdir()
  config = _config(teacher)
  # All three runs at once: the plain one here, while the others run as processes.
  with MainJob(tmp_path / "two" / "workdir", teacher, 2, 4, tmp_path / "two") as two_job, \
       MainJob(tmp_path / "one" / "workdir", teacher, 1, 8, tmp_path / "one") as one_job:
    train.train_and_evaluate(config, str(tmp_path / "plain"))
    two_job.wait()
    one_job.wait()

  # Each process read its own half of every global batch, and nothing else.
  one = np.load(tmp_path / "one" / "indices_0.npy")
  halves = [np.load(tmp_path / "two" / f"indices_{i}.npy") for i in range(2)]
  assert one.shape == (config.num_train_steps, config.batch_size)
  for half in halves:
    assert half.shape == (config.num_train_steps, config.batch_size // 2)
  np.testing.assert_array_equal(np.concatenate(halves, axis=1), one)
  for step in range(config.num_train_steps):
    assert not set(halves[0][step]) & set(halves[1][step])

  # Same logged losses, gradient norms, learning rates ... at every log step.
  two, gloo, plain = (_training_scalars(tmp_path / d) for d in
                      ("two/workdir", "one/workdir", "plain"))
  assert {"loss", "grad_norm", "loss_per_segment/1"} <= set(two)
  assert set(two) == set(gloo) == set(plain)
  steps = list(range(5, config.num_train_steps + 1, 5))
  for tag in two:
    assert [s for s, _ in two[tag]] == steps, tag
    assert two[tag] == gloo[tag], tag  # bitwise
    # float32 rounding of differently ordered sums (see the module docstring).
    np.testing.assert_allclose([v for _, v in two[tag]], [v for _, v in plain[tag]],
                               rtol=1e-5, err_msg=tag)

  # Same final train state: parameters, EMA, optimiser moments, counters.
  builder = train_step.StepBuilder.from_config(config)
  step_two, state_two = _restore_state(tmp_path / "two" / "workdir", builder)
  step_gloo, state_gloo = _restore_state(tmp_path / "one" / "workdir", builder)
  step_plain, state_plain = _restore_state(tmp_path / "plain", builder)
  assert step_two == step_gloo == step_plain == config.num_train_steps
  leaves = zip(jax.tree.leaves(state_two), jax.tree.leaves(state_gloo),
               jax.tree.leaves(state_plain), strict=True)
  for a, b, c in leaves:
    np.testing.assert_array_equal(a, b)
    # Far below one Adam update (~learning rate 1e-3 per weight): a lost or
    # doubled shard of the batch would show.
    np.testing.assert_allclose(a, c, rtol=1e-5, atol=1e-6)
