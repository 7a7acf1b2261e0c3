"""`sample` never writes non-finite samples out: a checkpoint whose weights hold NaN (written
with matching checksums, as a run that diverged before the trainer's checks, or a
checkpoint from before checksums, would be) is refused before sampling, and weights that
are finite but overflow every sample are refused before anything is written; both in one
line naming the checkpoint's step and the earlier complete ones, exit 4. And a sampler
that would write poor samples without saying so, Heun on the uniform grid, is warned about.
"""
import glob
import os
import shutil

import numpy as np
import orbax.checkpoint as ocp
import pytest

from multistep_cm.runtime import checkpointing
from multistep_cm.training import loop as train

from helpers import run_module
from helpers import tiny_mixture

BAD_CHECKPOINT = 4  # docs/operations.md's table


@pytest.fixture(scope="module")
def teacher(tmp_path_factory):
  """A tiny mixture diffusion run with complete checkpoints of steps 1 and 2."""
  path = tmp_path_factory.mktemp("nonfinite") / "teacher"
  train.train_and_evaluate(tiny_mixture(steps=2, checkpoint_every_steps=1), str(path))
  return path


class _State:
  """What `Checkpointer.save` reads of a train state."""

  def __init__(self, items):
    self.params, self.ema, self.opt_state = items["params"], items["ema"], items["opt_state"]
    self._train = items["train"]

  def counters(self):
    return self._train


def rewrite_weights(workdir, step, change):
  """Rewrites checkpoint `step` with `change(array)` applied to every floating-point array of
  its parameters and EMAs, saved with checksums of the new values (so they verify)."""
  directory = checkpointing.checkpoint_dir(str(workdir))
  ckpt = checkpointing.Checkpointer(directory, async_save=False)
  names = ("params", "ema", "opt_state", "train")
  items = ckpt.manager.restore(step, args=ocp.args.Composite(
      **{n: ocp.args.StandardRestore() for n in names}, meta=ocp.args.JsonRestore()))
  meta = {k: v for k, v in items["meta"].items() if k != "checksums"}
  changed = {n: items[n] for n in names}
  for name in ("params", "ema"):
    changed[name] = _map_floats(items[name], change)
  ckpt.close()
  shutil.rmtree(os.path.join(directory, str(step)))
  ckpt = checkpointing.Checkpointer(directory, async_save=False)
  ckpt.save(step, _State(changed), meta)
  ckpt.manager.wait_until_finished()
  ckpt.close()


def _map_floats(tree, change):
  if isinstance(tree, dict):
    return {k: _map_floats(v, change) for k, v in tree.items()}
  array = np.asarray(tree)
  return change(array) if np.issubdtype(array.dtype, np.floating) else tree


@pytest.mark.parametrize("damage,fragments", [
    # NaN weights: refused as soon as they are loaded, nothing sampled.
    (lambda a: np.full_like(a, np.nan), ["step 2", "non-finite values", "nothing sampled"]),
    # Finite weights 1e30 times too large: every sample overflows.
    (lambda a: a * np.float32(1e30), ["samples of checkpoint", "step 2", "not finite",
                                      "nothing written"]),
], ids=["nan_weights", "overflowing_weights"])
def test_sample_refuses_nonfinite_weights_or_samples(teacher, tmp_path, damage, fragments):
  run = tmp_path / "teacher"
  shutil.copytree(teacher, run)
  rewrite_weights(run, 2, damage)
  out = tmp_path / "out" / "s.npz"
  proc = run_module("multistep_cm.sample", f"--workdir={run}", f"--output={out}",
                    "--num_samples=8", "--progress=false", check=False, timeout=180)
  assert proc.returncode == BAD_CHECKPOINT, proc.stderr[-3000:]
  assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
  errors = [line for line in proc.stderr.splitlines() if "error:" in line]
  assert len(errors) == 1 and errors[0].startswith("sample: error: "), proc.stderr[-3000:]
  for fragment in fragments + ["earlier checkpoints: steps [1]", "--checkpoint_step"]:
    assert fragment in errors[0], (fragment, errors[0])
  assert not glob.glob(str(tmp_path / "out" / "*"))
  # The earlier complete checkpoint still samples, finitely.
  proc = run_module("multistep_cm.sample", f"--workdir={run}", f"--output={out}",
                    "--num_samples=8", "--progress=false", "--checkpoint_step=1",
                    check=False, timeout=180)
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert np.isfinite(np.load(out)["x"]).all()


def test_sample_warns_about_heun_on_the_uniform_grid(teacher, tmp_path):
  """Heun on the default uniform grid is far worse than DDIM (docs/results.md): a warning
  naming --spacing=karras; none on the Karras grid."""
  for spacing, warned in (("uniform", True), ("karras", False)):
    proc = run_module("multistep_cm.sample", f"--workdir={teacher}",
                      f"--output={tmp_path / spacing}.npz", "--num_samples=4", "--steps=2",
                      "--sampler=heun", f"--spacing={spacing}", "--progress=false",
                      check=False, timeout=180)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert ("--spacing=karras" in proc.stderr) == warned, proc.stderr[-3000:]


@pytest.mark.parametrize("damage,fragments", [
    (lambda a: np.full_like(a, np.nan), ["weights hold NaN or inf", "nothing sampled"]),
    (lambda a: a * np.float32(1e30), ["not finite", "nothing scored or written"]),
], ids=["nan_weights", "overflowing_weights"])
def test_evaluate_refuses_nonfinite_weights_or_samples(teacher, tmp_path, damage, fragments):
  """`evaluate` as `sample`: no table of non-finite samples, one line naming the checkpoint
  and the earlier complete one (exit 4), nothing written."""
  run = tmp_path / "teacher"
  shutil.copytree(teacher, run)
  rewrite_weights(run, 2, damage)
  out = tmp_path / "out" / "eval"
  proc = run_module("multistep_cm.evaluate", f"--workdir={run}", f"--output={out}",
                    "--num_samples=8", "--steps=2", "--samplers=ddim", check=False,
                    timeout=180)
  assert proc.returncode == BAD_CHECKPOINT, proc.stderr[-3000:]
  assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
  errors = [line for line in proc.stderr.splitlines() if "error:" in line]
  assert len(errors) == 1 and errors[0].startswith("evaluate: error: "), proc.stderr[-3000:]
  for fragment in fragments + ["checkpoint step 2", "earlier checkpoints: steps [1]"]:
    assert fragment in errors[0], (fragment, errors[0])
  assert not glob.glob(str(tmp_path / "out" / "*"))
