"""Checkpoints detect their own corruption: checksums recorded at save and verified at
restore; a corrupt latest checkpoint is moved aside and the run resumes from the newest one
that verifies, exactly as an uninterrupted run; a corrupt teacher stops the main job (exit 4).
"""
import glob
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from multistep_cm.runtime import checkpointing
from multistep_cm.training import loop as train

from helpers import abstract_params
from helpers import run_main
from helpers import tiny_mixture


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16, jnp.int32, jnp.uint32])
def test_any_one_word_change_or_swap_changes_the_checksum(dtype):
  rng = np.random.default_rng(0)
  x = jnp.asarray(rng.integers(0, 1000, (37, 5)), dtype)
  tree = {"a": x, "b": {"c": jnp.arange(3, dtype=jnp.float32)}}
  base = checkpointing.tree_checksums(tree)
  assert sorted(base) == ["['a']", "['b']['c']"]
  bits = 16 if jnp.dtype(dtype).itemsize == 2 else 32
  uint = jnp.uint16 if bits == 16 else jnp.uint32
  words = np.asarray(jax.lax.bitcast_convert_type(x, uint)).ravel()
  for trial in range(40):
    i, bit = rng.integers(words.size), rng.integers(bits)
    flipped = words.copy()
    flipped[i] ^= np.asarray(1 << int(bit)).astype(flipped.dtype)
    changed = jax.lax.bitcast_convert_type(jnp.asarray(flipped.reshape(x.shape)), dtype)
    assert checkpointing.tree_checksums({**tree, "a": changed})["['a']"] != base["['a']"]
  swapped = np.asarray(x).copy()
  swapped[[0, 1]] = swapped[[1, 0]]
  if not np.array_equal(swapped, np.asarray(x)):
    assert checkpointing.tree_checksums({**tree, "a": jnp.asarray(swapped)})["['a']"] != base["['a']"]


def _config(steps):
  return tiny_mixture(steps=steps, checkpoint_every_steps=20)


def _largest_file(step_dir, item):
  files = [f for f in glob.glob(os.path.join(step_dir, item, "**", "d", "*"), recursive=True)
           if os.path.isfile(f)]
  return max(files, key=os.path.getsize)


def _final_params(workdir):
  ckpt, step = checkpointing.resolve(workdir)
  try:
    return step, ckpt.restore_params(step, abstract_params(_config(60)), "params")
  finally:
    ckpt.close()


@pytest.fixture(scope="module")
def straight(tmp_path_factory):
  """60 steps uninterrupted: what every recovered run must end with."""
  workdir = str(tmp_path_factory.mktemp("straight"))
  train.train_and_evaluate(_config(60), workdir)
  return _final_params(workdir)


def _corrupt_and_resume(workdir, corrupt, caplog):
  train.train_and_evaluate(_config(60), workdir, stop_after=40)  # checkpoints at 20, 40
  step_dir = os.path.join(checkpointing.checkpoint_dir(workdir), "40")
  corrupt(step_dir)
  with caplog.at_level("WARNING"):
    result = train.train_and_evaluate(_config(60), workdir)
  assert result.step == 60
  warnings = [r.getMessage() for r in caplog.records if "is corrupt" in r.getMessage()
              or "could not be read" in r.getMessage()]
  assert len(warnings) == 1 and "/40" in warnings[0], warnings
  assert "resuming from step 20 instead" in warnings[0], warnings
  assert os.path.isdir(checkpointing.checkpoint_dir(workdir) + "_corrupt/40")
  return warnings[0]


def _flip_bytes(path, offset_fraction=0.5, count=8):
  with open(path, "r+b") as fh:
    data = bytearray(fh.read())
    start = int(len(data) * offset_fraction)
    for i in range(start, start + count):
      data[i] ^= 0xFF
    fh.seek(0)
    fh.write(data)


def test_flipped_bytes_in_an_array_fall_back_to_the_previous_checkpoint(tmp_path, caplog,
                                                                         straight):
  workdir = str(tmp_path / "run")
  _corrupt_and_resume(workdir, lambda d: _flip_bytes(_largest_file(d, "params")), caplog)
  step, params = _final_params(workdir)
  assert step == straight[0]
  for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(straight[1])):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_a_truncated_file_falls_back_too(tmp_path, caplog, straight):
  workdir = str(tmp_path / "run")

  def truncate(step_dir):
    path = _largest_file(step_dir, "ema")
    with open(path, "r+b") as fh:
      fh.truncate(os.path.getsize(path) // 2)

  _corrupt_and_resume(workdir, truncate, caplog)
  step, params = _final_params(workdir)
  for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(straight[1])):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_bytes_that_read_back_but_changed_are_named_by_their_array(tmp_path):
  """Silent corruption (the bytes decode, but are not the ones written), made by changing
  one array's recorded checksum: restore names that array and the step."""
  workdir = str(tmp_path / "run")
  train.train_and_evaluate(_config(20), workdir)
  meta_path = os.path.join(checkpointing.checkpoint_dir(workdir), "20", "meta", "metadata")
  meta = json.load(open(meta_path))
  name = sorted(k for k in meta["checksums"] if k.startswith("params"))[0]
  meta["checksums"][name] = "0" * 16
  json.dump(meta, open(meta_path, "w"))
  ckpt, step = checkpointing.resolve(workdir)
  with pytest.raises(checkpointing.CorruptCheckpointError) as e:
    ckpt.restore_params(step, abstract_params(_config(20)), "params")
  assert f"array {name} does not match its checksum" in str(e.value) and "/20" in str(e.value)
  ckpt.close()


def test_a_corrupt_teacher_stops_the_main_job_with_exit_4(tmp_path):
  teacher = str(tmp_path / "teacher")
  train.train_and_evaluate(_config(20), teacher)
  _flip_bytes(_largest_file(os.path.join(checkpointing.checkpoint_dir(teacher), "20"), "ema"))
  proc = run_main("configs/mixture_cd.py", tmp_path / "cd",
                  {"teacher_checkpoint": teacher, "init_from": "", "num_train_steps": 2,
                   "batch_size": 64, "model.width": 32, "model.depth": 2,
                   "loss.teacher_steps_start": 8, "loss.teacher_steps_end": 16},
                  check=False)
  errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
  assert proc.returncode == 4, proc.stderr[-3000:]
  assert len(errors) == 1 and "config.teacher_checkpoint" in errors[0], proc.stderr[-3000:]
