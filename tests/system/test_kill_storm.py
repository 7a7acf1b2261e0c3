"""A kill storm: the staged tiny pipeline (tests/tiny_staged_config.py) driven to completion
through repeated SIGKILLs at random moments, restarting the same command each time, ends
with every stage's final checkpoint equal, bitwise, to an uninterrupted run's, and with
every step's example ids consumed exactly once as far as the record goes. Also a SIGTERM
during the teacher's final save and one during the student's first compile.
"""
import os
import random
import signal
import time

import jax
import numpy as np
import pytest

from multistep_cm.data import pipeline as pipeline_lib
from multistep_cm.runtime import checkpointing
from multistep_cm.training import loop as train
from multistep_cm.training import step as train_step

from helpers import file_config
from helpers import main_args
from helpers import popen_module
from helpers import run_main

CONFIG = "tests/tiny_staged_config.py"
STAGES = ("teacher", "cd2")
SEED, MIN_KILLS = 0, 6


@pytest.fixture(scope="module")
def jax_cache(tmp_path_factory):
  return str(tmp_path_factory.mktemp("jax_cache"))


@pytest.fixture(scope="module")
def reference(tmp_path_factory, jax_cache):
  """The uninterrupted run."""
  workdir = tmp_path_factory.mktemp("reference")
  run_main(CONFIG, workdir, cache=jax_cache)
  return workdir


def _stage_config(name):
  return train.resolve_stage(file_config(CONFIG).stages[name], "/unused")


def _final_state(workdir, name):
  config = _stage_config(name)
  ckpt = checkpointing.Checkpointer(checkpointing.checkpoint_dir(str(workdir / name)),
                                    read_only=True, async_save=False)
  try:
    assert ckpt.latest_step() == config.num_train_steps
    abstract = train_step.StepBuilder.from_config(config).layout.abstract
    return ckpt.restore_state(config.num_train_steps, abstract)[0]
  finally:
    ckpt.close()


def _assert_same_as_reference(workdir, reference):
  for name in STAGES:
    got, want = _final_state(workdir, name), _final_state(reference, name)
    for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True):
      np.testing.assert_array_equal(np.asarray(a), np.asarray(b), err_msg=name)
    ids = pipeline_lib.read_example_ids(str(workdir / name))
    expected = pipeline_lib.read_example_ids(str(reference / name))
    assert sorted(ids) == sorted(expected) == list(range(1, len(expected) + 1)), name
    for step, value in expected.items():
      np.testing.assert_array_equal(ids[step], value, err_msg=f"{name} step {step}")


def _where(workdir):
  """Where a run is: its stage, the newest complete checkpoint step of that stage, and
  whether a checkpoint write is unfinished."""
  stage = "cd2" if os.path.exists(workdir / "cd2" / "config.json") else "teacher"
  directory = checkpointing.checkpoint_dir(str(workdir / stage))
  names = os.listdir(directory) if os.path.isdir(directory) else []
  steps = [int(n) for n in names if n.isdigit()]
  return stage, max(steps, default=0), any("tmp" in n for n in names)


def _kill_at_a_random_moment(proc, workdir, rng):
  """SIGKILLs `proc` at a seeded random moment: one time in five during start-up or
  compilation, else after its first new checkpoint (so every restart makes progress),
  plus up to 3 s. Returns where it landed, or None if the run finished first."""
  if rng.random() < 0.2:
    deadline = time.time() + rng.uniform(0.5, 4.0)
  else:
    start = _where(workdir)[:2]
    deadline = time.time() + 300
    while _where(workdir)[:2] == start and proc.poll() is None and time.time() < deadline:
      time.sleep(0.01)
    deadline = time.time() + rng.uniform(0.0, 3.0)
  while time.time() < deadline and proc.poll() is None:
    time.sleep(0.005)
  if proc.poll() is not None:
    return None
  stage, _, writing = _where(workdir)
  proc.send_signal(signal.SIGKILL)
  assert proc.wait(timeout=60) == -signal.SIGKILL
  return stage, writing


def test_kill_storm_ends_as_an_uninterrupted_run(tmp_path, jax_cache, reference):
  workdir = tmp_path / "storm"
  rng = random.Random(SEED)
  kills, landed, started = [], set(), time.time()
  for attempt in range(60):
    with open(tmp_path / f"run{attempt}.log", "w") as log:
      proc = popen_module("multistep_cm.main", *main_args(CONFIG, workdir), log=log,
                          cache=jax_cache)
    if len(kills) >= MIN_KILLS and {"teacher", "cd2", "write"} <= landed:
      assert proc.wait(timeout=600) == 0, (tmp_path / f"run{attempt}.log").read_text()[-3000:]
      break
    where = _kill_at_a_random_moment(proc, workdir, rng)
    if where is None:  # finished before the kill
      assert proc.returncode == 0, (tmp_path / f"run{attempt}.log").read_text()[-3000:]
      break
    kills.append(where)
    landed |= {where[0]} | ({"write"} if where[1] else set())
  in_writes = sum(w for _, w in kills)
  print(f"kill storm: {len(kills)} SIGKILLs ({sum(s == 'teacher' for s, _ in kills)} in the "
        f"teacher, {sum(s == 'cd2' for s, _ in kills)} in the student, {in_writes} inside a "
        f"checkpoint write) in {time.time() - started:.0f} s")
  assert len(kills) >= MIN_KILLS and {"teacher", "cd2", "write"} <= landed, kills
  _assert_same_as_reference(workdir, reference)


def _sigterm_when(tmp_path, workdir, jax_cache, condition, name):
  """Starts the pipeline and sends SIGTERM as soon as `condition()` holds; returns the exit
  code, or None if the run got past the moment unseen (then it is killed)."""
  with open(tmp_path / f"{name}.log", "w") as log:
    proc = popen_module("multistep_cm.main", *main_args(CONFIG, workdir), log=log,
                        cache=jax_cache)
  held = None
  try:
    while proc.poll() is None:
      held = condition()
      if held is not None:
        break
      time.sleep(0.002)
    if not held:
      return None
    proc.send_signal(signal.SIGTERM)
    return proc.wait(timeout=300)
  finally:
    if proc.poll() is None:
      proc.kill()
      proc.wait()


def test_sigterm_in_the_teachers_final_save_and_the_students_first_compile(
    tmp_path, jax_cache, reference):
  """The teacher's final save: the run completes the teacher, exits 75 and does not start
  the student. The student's first compile (after its stage began): it trains one step,
  saves it and exits 75. Restarted, the pipeline ends as the uninterrupted one."""
  for attempt in range(5):  # the final save lasts milliseconds: poll until one is seen
    workdir = tmp_path / f"run{attempt}"
    final = checkpointing.checkpoint_dir(str(workdir / "teacher"))

    def in_final_save():
      if os.path.exists(workdir / "cd2"):
        return False  # missed it
      names = os.listdir(final) if os.path.isdir(final) else []
      return True if any(n.startswith("30.") and "tmp" in n for n in names) else None

    code = _sigterm_when(tmp_path, workdir, jax_cache, in_final_save, f"final_save{attempt}")
    if code is not None:
      break
  assert code == 75, (tmp_path / f"final_save{attempt}.log").read_text()[-3000:]
  assert not os.path.exists(workdir / "cd2")  # the student did not start
  teacher = checkpointing.checkpoint_dir(str(workdir / "teacher"))
  assert max(int(n) for n in os.listdir(teacher) if n.isdigit()) == 30

  log = tmp_path / "first_compile.log"

  def compiling():  # the student's trainer has started: its stop handler is installed
    text = log.read_text() if log.exists() else ""
    return True if "Mesh " in text.partition("Stage cd2")[2] else None

  assert _sigterm_when(tmp_path, workdir, jax_cache, compiling, "first_compile") == 75
  student = checkpointing.checkpoint_dir(str(workdir / "cd2"))
  assert sorted(int(n) for n in os.listdir(student) if n.isdigit()) == [1]
  run_main(CONFIG, workdir, cache=jax_cache)
  _assert_same_as_reference(workdir, reference)
