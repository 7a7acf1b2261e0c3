"""Reliability, each by doing the bad thing for real: signals, kills, bad configs, bad files, full
and read-only disks.

Runs that get a signal or must show their exit code are `python -m multistep_cm.main`
subprocesses, mostly of a tiny mixture config; in-process runs use the same config, and all
share one persistent compilation cache, so each device count compiles the train step about
once. Bad data is a real array_record dataset with a record that is not an image
(data/synthetic.py). The full and read-only disks are real tmpfs mounts, which need root with
CAP_SYS_ADMIN; those tests skip elsewhere.
"""
import contextlib
import errno
import os
import signal
import subprocess
import sys
import time

import jax
from jax.experimental.compilation_cache import compilation_cache
import numpy as np
import pytest

from multistep_cm.config import build as config_build
from multistep_cm.config import checks as config_checks
from multistep_cm.data import pipeline as pipeline_lib
from multistep_cm.data import sources
from multistep_cm.data import synthetic
from multistep_cm.runtime import checkpointing
from multistep_cm.training import loop as train
from multistep_cm.training import step as train_step

from helpers import assert_one_line_error
from helpers import file_config
from helpers import free_port
from helpers import main_args
from helpers import run_main
from helpers import run_module
from helpers import started_main
from helpers import TINY_MIXTURE

MIXTURE = "configs/mixture_diffusion.py"
TINY_IMAGE = "tests/tiny_image_config.py"
# The tiny mixture run (helpers.TINY_MIXTURE) with a constant learning rate, so
# `num_train_steps` only says where to stop and runs of different lengths share one
# compiled step.
TINY = {**TINY_MIXTURE, "optimizer.schedule": "constant", "checkpoint_every_steps": 0,
        "checkpoint_keep": 3}


@pytest.fixture(scope="module", autouse=True)
def jax_cache(tmp_path_factory):
  """One persistent compilation cache for this module's runs, in-process and subprocesses."""
  path = str(tmp_path_factory.mktemp("jax_cache"))
  saved = {k: getattr(jax.config, k) for k in ("jax_compilation_cache_dir",
                                               "jax_persistent_cache_min_compile_time_secs")}
  jax.config.update("jax_compilation_cache_dir", path)
  jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)
  compilation_cache.reset_cache()
  yield path
  for key, value in saved.items():
    jax.config.update(key, value)
  compilation_cache.reset_cache()


def mixture(overrides):
  """The config `run_main(MIXTURE, workdir, overrides)` trains, built in this process."""
  return file_config(MIXTURE, overrides)


def wait_for(condition, *procs, timeout=180.0, poll=0.05):
  """Polls `condition()` until it returns something true; fails if a process exits first."""
  deadline = time.time() + timeout
  while time.time() < deadline:
    value = condition()
    if value:
      return value
    for proc in procs:
      if proc.poll() is not None:
        raise AssertionError(f"a run exited ({proc.returncode}) before the condition held")
    time.sleep(poll)
  raise AssertionError("timed out")


def checkpoint_dirs(workdir):
  """`(complete steps, temporary dirs)` in the workdir's checkpoint directory."""
  try:
    names = os.listdir(checkpointing.checkpoint_dir(str(workdir)))
  except FileNotFoundError:
    return [], []
  return sorted(int(n) for n in names if n.isdigit()), [n for n in names if "tmp" in n]


def restore_all(workdir, config, devices=None):
  """Every checkpoint in `workdir`, restored in full: `{step: TrainState}`."""
  abstract = train_step.StepBuilder.from_config(config, devices).layout.abstract
  ckpt = checkpointing.Checkpointer(checkpointing.checkpoint_dir(str(workdir)), read_only=True,
                                    async_save=False)
  try:
    return {s: ckpt.restore_state(s, abstract)[0] for s in ckpt.all_steps()}
  finally:
    ckpt.close()


def assert_finite(state):
  for leaf in jax.tree.leaves((state.params, state.ema, state.opt_state)):
    assert np.all(np.isfinite(np.asarray(leaf)))


# --- preemption, kills, exact resume --------------------------------------------------------


def assert_same_params(workdir_a, workdir_b, step, config, exact=True):
  a = restore_all(workdir_a, config)[step].params
  b = restore_all(workdir_b, config)[step].params
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
    if exact:
      np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
    else:
      np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=1e-4, atol=1e-5)


def test_sigterm_saves_the_current_step_and_the_resumed_run_equals_an_uninterrupted_one(
    tmp_path, jax_cache, caplog):
  """SIGTERM mid-run: exit 75 with a checkpoint at the step it was at (not a periodic one);
  the restart continues from it, consumes exactly the examples (by id) an uninterrupted run
  consumes, and ends with the same parameters."""
  workdir = tmp_path / "run"
  long_run = dict(TINY, num_train_steps=100_000, record_example_ids=True)
  with started_main(MIXTURE, workdir, long_run, log_path=tmp_path / "first.log",
                    cache=jax_cache) as proc:
    wait_for(lambda: len(pipeline_lib.read_example_ids(str(workdir))) >= 3, proc)
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=120) == 75
  log = (tmp_path / "first.log").read_text()
  assert "Received signal 15: saving a checkpoint and stopping." in log
  assert "Traceback" not in log
  stopped_at = max(pipeline_lib.read_example_ids(str(workdir)))  # the last step it trained
  assert checkpoint_dirs(workdir) == ([stopped_at], [])  # checkpoint_every_steps=0

  total = stopped_at + 6
  caplog.set_level("INFO")
  train.train_and_evaluate(mixture(dict(long_run, num_train_steps=total)), str(workdir))
  assert f"at step {stopped_at}." in caplog.text  # "Resumed from ... at step k."
  straight = tmp_path / "straight"
  train.train_and_evaluate(mixture(dict(long_run, num_train_steps=total)), str(straight))
  expected = pipeline_lib.read_example_ids(str(straight))
  resumed = pipeline_lib.read_example_ids(str(workdir))
  assert sorted(resumed) == sorted(expected) == list(range(1, total + 1))
  for step in expected:
    np.testing.assert_array_equal(resumed[step], expected[step], err_msg=f"step {step}")
  assert_same_params(workdir, straight, total, mixture(long_run))


def test_a_second_signal_goes_to_the_previous_handler():
  """The first SIGINT asks the loop to stop after a checkpoint; a second, while that stop is
  under way, reaches the handler from before (Python's: KeyboardInterrupt)."""
  stop = train.StopSignal((signal.SIGINT,))
  # Python's own handler before it, as in `python -m multistep_cm.main` (a test worker may
  # have set another).
  outer = signal.signal(signal.SIGINT, signal.default_int_handler)
  try:
    with stop:
      if signal.getsignal(signal.SIGINT) != stop._handle:  # pylint: disable=protected-access
        pytest.skip("signal handlers can be installed from the main thread only")
      signal.raise_signal(signal.SIGINT)
      assert stop.requested()
      with pytest.raises(KeyboardInterrupt):
        signal.raise_signal(signal.SIGINT)
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler
  finally:
    signal.signal(signal.SIGINT, outer)


def test_an_interrupted_run_exits_130_in_one_line(tmp_path):
  """What main answers to that KeyboardInterrupt: one line and exit 130, no traceback."""
  proc = run_module("interrupted_main", *main_args(MIXTURE, tmp_path / "run", TINY),
                    check=False)
  assert_one_line_error(proc, 130, "interrupted")


@pytest.mark.slow  # two processes, then a third on 4 devices: about a minute
def test_preemption_of_one_host_stops_all_and_resumes_on_one_host_with_4_devices(
    tmp_path, jax_cache):
  """Two processes (4 devices each, one 2x4 mesh); a SIGTERM reaches one of them, as a
  maintenance notice reaches one host of a pod: JAX's preemption sync point stops both at
  the same step, each exits 75 after the (collective) checkpoint. The run then continues
  as one process on 4 devices: the checkpoint restores onto the new mesh, and the two
  parts together consume exactly the examples of an uninterrupted one-process run."""
  workdir = tmp_path / "run"
  port = free_port()  # for the coordinator
  long_run = dict(TINY, num_train_steps=100_000, record_example_ids=True)
  with contextlib.ExitStack() as stack:
    procs = [stack.enter_context(started_main(
        MIXTURE, workdir, long_run, f"--coordinator_address=localhost:{port}",
        "--num_processes=2", f"--process_id={i}", log_path=tmp_path / f"process{i}.log",
        devices=4, cache=jax_cache)) for i in range(2)]
    wait_for(lambda: len(pipeline_lib.read_example_ids(str(workdir), 1)) >= 3, *procs)
    procs[1].send_signal(signal.SIGTERM)
    assert [p.wait(timeout=120) for p in procs] == [75, 75]
  first = [pipeline_lib.read_example_ids(str(workdir), i) for i in range(2)]
  stopped_at = max(first[0])
  assert max(first[1]) == stopped_at
  assert checkpoint_dirs(workdir) == ([stopped_at], [])

  total = stopped_at + 6
  on_4 = dict(long_run, num_train_steps=total, **{"mesh.data": 1, "mesh.fsdp": 4})
  proc = run_main(MIXTURE, workdir, on_4, devices=4, cache=jax_cache)
  assert "over 4 devices (1 processes)" in proc.stderr
  assert f"at step {stopped_at}." in proc.stderr  # "Resumed from ... at step k."

  straight = tmp_path / "straight"
  train.train_and_evaluate(mixture(dict(long_run, num_train_steps=total)), str(straight))
  expected = pipeline_lib.read_example_ids(str(straight))
  # Process 0's file: its half of each batch up to the preemption, then whole batches.
  after = pipeline_lib.read_example_ids(str(workdir), 0)
  assert sorted(after) == sorted(expected) == list(range(1, total + 1))
  for step, ids in expected.items():
    got = np.concatenate([first[0][step], first[1][step]]) if step <= stopped_at else after[step]
    np.testing.assert_array_equal(got, ids, err_msg=f"step {step}")

  # The 8-device checkpoint restores onto a 4-device mesh unchanged; the parameters at the
  # end match the uninterrupted run's up to float rounding (reductions over 4 and 8 devices
  # add in different orders).
  ckpt = checkpointing.Checkpointer(checkpointing.checkpoint_dir(str(workdir)), read_only=True)
  try:
    on_4_mesh = train_step.StepBuilder.from_config(mixture(on_4), devices=jax.devices()[:4]).layout.abstract
    on_8_mesh = train_step.StepBuilder.from_config(mixture(long_run)).layout.abstract
    for a, b in zip(jax.tree.leaves(ckpt.restore_state(stopped_at, on_4_mesh)[0]),
                    jax.tree.leaves(ckpt.restore_state(stopped_at, on_8_mesh)[0])):
      assert len(a.sharding.device_set) == 4
      np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  finally:
    ckpt.close()
  assert_same_params(workdir, straight, total, mixture(long_run), exact=False)


def test_sigkill_during_a_checkpoint_write_resumes_from_the_last_complete_one(
    tmp_path, jax_cache, caplog):
  """kill -9 while orbax writes a checkpoint (its temporary directory exists): the restart
  resumes from the last complete checkpoint, with no error and no manual cleanup."""
  workdir = tmp_path / "run"
  # A checkpoint every step: the process spends most of its time inside a save.
  every_step = dict(TINY, num_train_steps=100_000, checkpoint_every_steps=1)
  for attempt in range(5):
    with started_main(MIXTURE, workdir, every_step, log_path=tmp_path / f"run{attempt}.log",
                      cache=jax_cache) as proc:
      wait_for(lambda: checkpoint_dirs(workdir)[0], proc)
      wait_for(lambda: checkpoint_dirs(workdir)[1], proc, poll=0.002)
      proc.send_signal(signal.SIGKILL)
      assert proc.wait(timeout=60) == -signal.SIGKILL
    complete, temporary = checkpoint_dirs(workdir)
    if temporary:  # the kill landed inside a write (else it finished in between: again)
      break
  assert temporary, "no kill landed inside a checkpoint write in 5 attempts"
  last = max(complete)

  caplog.set_level("INFO")
  result = train.train_and_evaluate(mixture(dict(every_step, num_train_steps=last + 2)),
                                    str(workdir))
  assert f"at step {last}." in caplog.text  # "Resumed from ... at step k."
  assert result.step == last + 2 and not result.preempted
  complete, temporary = checkpoint_dirs(workdir)
  assert temporary == [] and complete[-1] == last + 2
  assert_finite(restore_all(workdir, mixture(every_step))[last + 2])


# --- non-finite losses --------------------------------------------------------------------


def test_nonfinite_skip_counts_the_steps_that_saw_a_nan_example(tmp_path, monkeypatch):
  """One NaN example in the data: exactly the steps whose batch holds it are skipped and
  counted (`skipped_updates`); training goes on and every checkpoint is finite."""
  config = mixture(dict(TINY, num_train_steps=30, checkpoint_every_steps=10,
                        record_example_ids=True, **{"data.mixture_size": 256}))
  clean = config_build.make_source(config)
  x = np.array(clean.get(np.arange(len(clean)))["x"])
  nan_row = 17
  x[nan_row] = np.nan
  monkeypatch.setattr(config_build, "make_source",
                      lambda _: sources.ArraySource({"x": x}, num_classes=0))

  result = train.train_and_evaluate(config, str(tmp_path))
  assert result.step == 30
  ids = pipeline_lib.read_example_ids(str(tmp_path))
  bad_steps = [s for s in sorted(ids) if nan_row in ids[s]]
  assert 0 < len(bad_steps) < 30
  assert result.final_metrics["skipped_updates"] == len(bad_steps)
  states = restore_all(tmp_path, config)
  assert sorted(states) == [10, 20, 30]
  for step, state in states.items():
    assert_finite(state)
    assert int(state.num_skipped) == sum(s <= step for s in bad_steps)
    assert int(state.first_nonfinite_step) == bad_steps[0]


def test_nonfinite_stop_exits_5_naming_the_step_and_saves_nothing_after_it(tmp_path, jax_cache):
  """A learning rate that overflows the loss, nonfinite='stop': exit 5 naming the step; no
  checkpoint at or after it, and every checkpoint is finite."""
  overrides = dict(TINY, num_train_steps=50, checkpoint_every_steps=1, nonfinite="stop",
                   **{"optimizer.learning_rate": 1e30})
  proc = run_main(MIXTURE, tmp_path, overrides, check=False, cache=jax_cache)
  line = assert_one_line_error(proc, 5, "non-finite loss or gradient at step")
  bad_step = int(line.split("at step ")[1].split()[0])
  states = restore_all(tmp_path, mixture(overrides))
  assert states and max(states) < bad_step
  for state in states.values():
    assert_finite(state)


# --- config validation ----------------------------------------------------------------------


@pytest.mark.parametrize("overrides,processes,key", [
    ({"batch_size": 60}, 1, "config.batch_size"),  # not divisible by the 8 devices
    ({"batch_size": 64}, 3, "config.batch_size"),  # ... nor by 3 processes
    ({"mesh.data": 3}, 1, "config.mesh"),
    ({"data.dataset": "digits", "model.preset": "digits8", "data.image_size": 9}, 1,
     "config.data.image_size"),
    ({"data.dataset": "digits", "model.preset": "digits8", "data.image_size": 12}, 1,
     "config.data.image_size"),  # the preset could, the digits cannot
    ({"data.dataset": "digits", "model.preset": "small32", "data.image_size": 12}, 1,
     "config.data.image_size"),
    ({"loss.mode": "ct", "loss.student_steps": 3}, 1, "config.loss.student_steps"),
    ({"sample_sampler": "dpm"}, 1, "config.sample_sampler"),
    ({"loss.mode": "consistency"}, 1, "config.loss.mode"),
    ({"model.preset": "unet"}, 1, "config.model.preset"),
    ({"data.dataset": "cifar10"}, 1, "config.data.dataset"),
    ({"optimizer.learning_rate": float("inf")}, 1, "config.optimizer.learning_rate"),
    ({"teacher_weights": "ema"}, 1, "config.teacher_weights"),
])
def test_config_errors_name_the_key_and_what_is_allowed(overrides, processes, key):
  config = mixture(dict(TINY, **overrides))
  with pytest.raises(config_checks.ConfigError) as error:
    config_checks.validate(config, num_devices=8, num_processes=processes)
  message = str(error.value)
  assert message.startswith(key) and "\n" not in message, message
  assert "must" in message, message  # ... and says what is allowed


@pytest.mark.parametrize("args,key", [
    (["--config.data.dataset=digits", "--config.model.preset=digits8",
      "--config.data.image_size=12"], "config.data.image_size"),
    (["--config.sample_sampler=dpm"], "config.sample_sampler"),
    (["--config.model.no_such_key=1"], "--config.model.no_such_key"),
    (["--config.batch_size=many"], "--config.batch_size"),
])
def test_main_rejects_a_bad_config_in_one_line_before_training(tmp_path, args, key):
  proc = run_main(MIXTURE, tmp_path / "w", None, *args, check=False, timeout=120)
  assert_one_line_error(proc, 2, key)
  assert not os.path.exists(tmp_path / "w")  # nothing written, nothing compiled


def test_missing_or_incompatible_teacher_fails_before_compiling(tmp_path, jax_cache):
  """Exit 4 naming the path and, for a teacher of another width, the mismatching arrays."""
  missing = mixture(dict(TINY, **{"loss.mode": "cd", "teacher_checkpoint": str(tmp_path / "no"),
                                  "loss.student_steps": 2}))
  missing.loss.teacher_steps_start, missing.loss.teacher_steps_end = 8, 16
  with pytest.raises(checkpointing.CheckpointError,
                     match="^config.teacher_checkpoint: no complete checkpoint found at '.*/no'"):
    train.train_and_evaluate(missing, str(tmp_path / "student0"))

  teacher = tmp_path / "teacher"
  train.train_and_evaluate(mixture(dict(TINY, num_train_steps=2)), str(teacher))
  student = {"loss.mode": "cd", "loss.student_steps": 2, "loss.teacher_steps_start": 8,
             "loss.teacher_steps_end": 16, "teacher_checkpoint": teacher, "model.width": 48}
  proc = run_main(MIXTURE, tmp_path / "student", dict(TINY, **student), check=False,
                  cache=jax_cache)
  line = assert_one_line_error(proc, 4, str(teacher), "checkpoint (32,), model (48,)")
  assert line.startswith("error: config.teacher_checkpoint: "), line
  assert "Compiled the train step" not in proc.stderr


# --- bad data -------------------------------------------------------------------------------



def test_missing_dataset_exits_3_naming_the_prepare_command(tmp_path, jax_cache):
  proc = run_main(TINY_IMAGE, tmp_path / "w", {"data.data_dir": tmp_path / "empty"},
                  check=False, cache=jax_cache)
  assert_one_line_error(proc, 3, "'synthetic_jpeg' is not prepared")
  # The command that fixes it follows on the next lines of the message.
  assert (f"python -m multistep_cm.data.prepare --dataset=synthetic_jpeg "
          f"--data_dir={tmp_path / 'empty'}") in proc.stderr
  assert "Compiled the train step" not in proc.stderr
  assert checkpoint_dirs(tmp_path / "w") == ([], [])


def test_corrupt_record_mid_training_exits_3_and_keeps_earlier_checkpoints(tmp_path, jax_cache):
  """The record first read at step 4 is not an image: exit 3 naming dataset, split and index;
  the checkpoints of steps 1-3 are intact. (On one device: the data path is the point, and
  the image model compiles fastest there.)"""
  # Which example the pipeline reads first at step 4 (data step 3): 64 examples, batch 16.
  order = pipeline_lib.Pipeline(sources.ArraySource({"x": np.zeros((64, 1))}), 16, 0, 0, 1)
  # Not example 0, which the trainer reads before it starts to check the data's shape.
  corrupt = int(next(i for i in order.example_indices(order.positions(3)) if i))
  data_dir = str(tmp_path / "tfds")
  synthetic.build(data_dir, num_examples=64, size_range=(8, 16), corrupt=[corrupt])

  overrides = {"data.data_dir": data_dir}
  proc = run_main(TINY_IMAGE, tmp_path / "w", overrides, check=False, devices=1, cache=jax_cache)
  assert_one_line_error(proc, 3, "'synthetic_jpeg'", "'train'", f"index {corrupt}")
  states = restore_all(tmp_path / "w", file_config(TINY_IMAGE, overrides),
                       devices=jax.devices()[:1])
  assert sorted(states) == [1, 2, 3]
  for state in states.values():
    assert_finite(state)


# --- a read-only or full workdir ------------------------------------------------------------


@contextlib.contextmanager
def tmpfs(path, size):
  """A real tmpfs of `size` mounted at `path` (skips the test where mounting is not allowed)."""
  os.makedirs(path, exist_ok=True)
  try:
    mount = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)],
                           capture_output=True, text=True, check=False)
    error = mount.stderr.strip() if mount.returncode else None
  except FileNotFoundError as e:
    error = str(e)
  if error is not None:
    pytest.skip(f"cannot mount a tmpfs here (needs root with CAP_SYS_ADMIN): {error}")
  try:
    yield path
  finally:
    subprocess.run(["umount", "-l", str(path)], check=False)


def test_read_only_workdir_exits_6_and_keeps_its_checkpoints(tmp_path, jax_cache):
  with tmpfs(tmp_path / "disk", "16m") as disk:
    workdir = disk / "w"
    config = mixture(dict(TINY, num_train_steps=4))
    train.train_and_evaluate(config, str(workdir))
    subprocess.run(["mount", "-o", "remount,ro", str(disk)], check=True)
    proc = run_main(MIXTURE, workdir, dict(TINY, num_train_steps=8), check=False,
                    cache=jax_cache)
    assert_one_line_error(proc, 6, str(workdir), os.strerror(errno.EROFS))
    assert checkpoint_dirs(workdir) == ([4], [])
    assert_finite(restore_all(workdir, config)[4])


def test_a_workdir_in_use_exits_7_naming_its_holder_and_writes_nothing(tmp_path, jax_cache):
  """A second main on a workdir another run holds: exit 7 in one line naming the holder,
  before any config record or checkpoint is written."""
  workdir = tmp_path / "w"
  workdir.mkdir()
  with checkpointing.workdir_lock(str(workdir)):
    proc = run_main(MIXTURE, workdir, dict(TINY, num_train_steps=4), check=False,
                    cache=jax_cache)
  assert_one_line_error(proc, 7, str(workdir), f"pid {os.getpid()}", "in use")
  assert sorted(os.listdir(workdir)) == [checkpointing.LOCK_FILE]


def test_the_workdir_lock_excludes_a_second_holder_and_dies_with_its_process(tmp_path):
  """While another process holds the lock, taking it raises WorkdirInUseError; once that
  process is SIGKILLed the lock is free again, with nothing to clean up."""
  workdir = str(tmp_path)
  holder = subprocess.Popen(
      [sys.executable, "-c", "import fcntl, sys, time; f = open(sys.argv[1], 'a+'); "
       "fcntl.flock(f, fcntl.LOCK_EX); print('held', flush=True); time.sleep(120)",
       os.path.join(workdir, checkpointing.LOCK_FILE)], stdout=subprocess.PIPE, text=True)
  try:
    assert holder.stdout.readline().strip() == "held"
    with pytest.raises(checkpointing.WorkdirInUseError, match="is in use"):
      with checkpointing.workdir_lock(workdir):
        pass
  finally:
    holder.kill()
    holder.wait()
  with checkpointing.workdir_lock(workdir):
    with open(os.path.join(workdir, checkpointing.LOCK_FILE), encoding="utf-8") as f:
      assert f.read().startswith(f"pid {os.getpid()} on ")


def test_full_disk_exits_6_keeps_earlier_checkpoints_and_resumes_once_freed(tmp_path, jax_cache):
  """The disk fills up mid-run (another writer takes the rest): exit 6; the checkpoints
  before are intact, and once space is freed the same command resumes from the last one."""
  with tmpfs(tmp_path / "disk", "8m") as disk:
    workdir = disk / "w"
    overrides = dict(TINY, num_train_steps=100_000, checkpoint_every_steps=5)
    with started_main(MIXTURE, workdir, overrides, log_path=tmp_path / "run.log",
                      cache=jax_cache) as proc:
      wait_for(lambda: checkpoint_dirs(workdir)[0], proc)
      filler = disk / "filler"
      # ENOSPC: the disk is full. Closing the file can raise it too (its buffer flushed
      # again), so the close is inside the suppression as well.
      with contextlib.suppress(OSError), open(filler, "wb") as fh:
        while True:
          fh.write(b"\0" * 65536)
          fh.flush()
      proc.wait(timeout=120)
    log = (tmp_path / "run.log").read_text()
    assert proc.returncode == 6, log[-3000:]
    assert "Traceback" not in log, log[-3000:]
    assert f"error: cannot write to the workdir {str(workdir)!r}: " in log
    assert os.strerror(errno.ENOSPC) in log
    complete, _ = checkpoint_dirs(workdir)
    config = mixture(overrides)
    states = restore_all(workdir, config)
    assert sorted(states) == complete and complete
    for state in states.values():
      assert_finite(state)

    os.remove(filler)
    last = complete[-1]
    result = train.train_and_evaluate(mixture(dict(overrides, num_train_steps=last + 2)),
                                      str(workdir))
    assert result.step == last + 2
    assert checkpoint_dirs(workdir)[1] == []
