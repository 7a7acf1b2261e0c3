"""Test session set-up: 8 simulated CPU devices, XLA at optimisation level 0, quiet TensorFlow.

XLA reads its flags when the backend starts, so they are set here, before any
test module imports jax.
"""
import atexit
import os
import shutil
import tempfile

os.environ.setdefault("JAX_PLATFORMS", "cpu")
_flags = os.environ.get("XLA_FLAGS", "")
if "xla_force_host_platform_device_count" not in _flags:
  _flags += " --xla_force_host_platform_device_count=8"
# The suite's programs are tiny and run a few steps: LLVM's optimisation of them costs more
# than it saves (level 0 compiled a tiny train step in ~55% of the time, and test_toy.py plus
# test_diffusion.py ran in 86 s against 119 s, 2026-12-07, 2-core CPU). Child processes
# inherit it (helpers.child_env); the commands themselves keep XLA's default. Float32
# rounding differs between the levels by an ulp or so, so a test that measures rounding
# itself runs its check in a child at the default level (test_samplers.py).
if "xla_backend_optimization_level" not in _flags:
  _flags += " --xla_backend_optimization_level=0"
os.environ["XLA_FLAGS"] = _flags.strip()
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
# The digits classifier is trained once per session into a private cache, not ~/.cache:
# made by the first process (xdist's workers inherit it) and removed when that one exits.
if "MULTISTEP_CM_CACHE" not in os.environ:
  os.environ["MULTISTEP_CM_CACHE"] = tempfile.mkdtemp(prefix="mcm_cache_")
  atexit.register(shutil.rmtree, os.environ["MULTISTEP_CM_CACHE"], True)


# The files that take minutes, longest first: pytest.ini runs the suite on two workers
# (pytest-xdist, one file per worker at a time, in collection order), and starting these
# first keeps one long file from running alone at the end. Measured with --durations.
_LONG_FILES = ("test_kill_storm.py", "test_t2i_demo.py", "test_sampling_eval.py",
               "test_without_tensorflow.py", "test_reliability.py", "test_toy.py",
               "test_train.py", "test_multihost.py")


def pytest_collection_modifyitems(session, config, items):
  del session, config
  rank = lambda item: (_LONG_FILES.index(item.path.name) if item.path.name in _LONG_FILES
                       else len(_LONG_FILES))
  items.sort(key=rank)  # stable: the order within a file, and of the other files, is kept


# --- the digits runs that several files sample and evaluate ----------------------------------

import contextlib  # pylint: disable=g-import-not-at-top,wrong-import-position
import fcntl  # pylint: disable=g-import-not-at-top,wrong-import-position
import shutil  # pylint: disable=g-import-not-at-top,wrong-import-position

import pytest  # pylint: disable=g-import-not-at-top,wrong-import-position


@contextlib.contextmanager
def _locked(path):
  with open(path, "w") as fh:
    fcntl.flock(fh, fcntl.LOCK_EX)
    try:
      yield
    finally:
      fcntl.flock(fh, fcntl.LOCK_UN)


def _train_digits_runs(root):
  """A tiny digits teacher (checkpoints of steps 10, 20, 30), its 2-step CD student
  (checkpoints of 10 and 20, in-training evals at both, a sample grid at 20) and its 4-step
  CD student (2 steps, no grids): what test_sampling_eval, test_checkpoint_curve and
  test_api read."""
  from multistep_cm.training import loop as train  # pylint: disable=g-import-not-at-top
  from helpers import tiny_digits  # pylint: disable=g-import-not-at-top
  teacher = os.path.join(root, "teacher")
  train.train_and_evaluate(tiny_digits(steps=30, checkpoint_every_steps=10, checkpoint_keep=5),
                           teacher)
  cd2 = tiny_digits("cd", steps=20, student_steps=2, teacher=teacher, checkpoint_every_steps=10)
  cd2.evals.update(every_steps=10, num_samples=64, batch_size=32, ode_steps=8)
  train.train_and_evaluate(cd2, os.path.join(root, "cd2"))
  train.train_and_evaluate(tiny_digits("cd", steps=2, student_steps=4, checkpoint_every_steps=2,
                                       teacher=teacher, sample_every_steps=0,
                                       **{"evals.every_steps": 0}),
                           os.path.join(root, "cd4"))


@pytest.fixture(scope="session")
def digits_runs(tmp_path_factory, worker_id):
  """`copy(dest, *names)`: the named runs of `_train_digits_runs` copied into `dest`.

  They are trained once per test session, by whichever pytest-xdist worker asks first
  (the others wait on a file lock in the session's shared temporary directory), and each
  test module gets its own copy, since evaluations write into the run directories."""
  base = tmp_path_factory.getbasetemp()
  shared = base if worker_id == "master" else base.parent
  root, done = shared / "digits_runs", shared / "digits_runs.done"
  with _locked(shared / "digits_runs.lock"):
    if not done.exists():
      shutil.rmtree(root, ignore_errors=True)
      _train_digits_runs(str(root))
      done.touch()

  def copy(dest, *names):
    for name in names:
      shutil.copytree(root / name, dest / name)
    return dest
  return copy
