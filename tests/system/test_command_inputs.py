"""`sample` and `evaluate` against bad input, as test_config_schema.py does for config keys:
each case goes through the command and must end with a documented non-zero exit, exactly
one line `<command>: error: ...` on stderr naming the flag, and no traceback, before
anything is sampled.

One tiny mixture pipeline is trained once for the module in a staged root: a 2-step
teacher (checkpoints of steps 1 and 2) and a 4-step CD student. The commands run as child
processes (each a few seconds, most of it importing JAX).
"""
import glob
import os
import shutil

import pytest

from multistep_cm.runtime import checkpointing
from multistep_cm.training import loop as train

from helpers import run_module
from helpers import tiny_mixture

# The exit codes of docs/operations.md's table that these commands use.
BAD_FLAG, BAD_CHECKPOINT, NOT_WRITABLE = 2, 4, 6


@pytest.fixture(scope="module")
def root(tmp_path_factory):
  """`<root>/teacher` (diffusion, checkpoints 1, 2) and `<root>/cd4` (a 4-step student)."""
  path = tmp_path_factory.mktemp("root")
  train.train_and_evaluate(tiny_mixture(steps=2, checkpoint_every_steps=1),
                           str(path / "teacher"))
  student = tiny_mixture("cd", steps=2, student_steps=4, teacher=str(path / "teacher"))
  train.train_and_evaluate(student, str(path / "cd4"))
  return path


def one_error_line(proc, command, code, *fragments):
  """Exit `code`, exactly one line starting `<command>: error: ` holding every fragment,
  no traceback; returns the line."""
  assert proc.returncode == code, (proc.returncode, proc.stderr[-3000:])
  assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
  prefix = f"{command}: error: "
  lines = [line for line in proc.stderr.splitlines() if line.startswith(prefix)]
  assert len(lines) == 1, proc.stderr[-3000:]
  assert len([l for l in proc.stderr.splitlines() if "error:" in l]) == 1, proc.stderr[-3000:]
  for fragment in fragments:
    assert fragment in lines[0], (fragment, lines[0])
  return lines[0]


def command(name, *args):
  return run_module(f"multistep_cm.{name}", *args, check=False, timeout=120)


# (flags, exit code, fragments of the line); {root} and {out} are filled in.
SAMPLE_CASES = {
    "no such workdir": (["--workdir={root}/nope"], BAD_FLAG, ["--workdir=", "does not exist"]),
    "a staged root": (["--workdir={root}"], BAD_FLAG,
                      ["--workdir=", "staged run's root", "['cd4', 'teacher']"]),
    "no such checkpoint step": (["--workdir={root}/teacher", "--checkpoint_step=7"], BAD_FLAG,
                                ["--checkpoint_step=7", "[1, 2]"]),
    "no such weights": (["--workdir={root}/teacher", "--weights=ema1"], BAD_FLAG,
                        ["--weights=ema1", "['params', 'ema0']"]),
    "zero samples": (["--workdir={root}/teacher", "--num_samples=0"], BAD_FLAG,
                     ["--num_samples", "got 0"]),
    "negative samples": (["--workdir={root}/teacher", "--num_samples=-3"], BAD_FLAG,
                         ["--num_samples", "got -3"]),
    "zero batch": (["--workdir={root}/teacher", "--batch_size=0"], BAD_FLAG, ["--batch_size"]),
    "steps not a number": (["--workdir={root}/teacher", "--steps=abc"], BAD_FLAG,
                           ["--steps=abc"]),
    "unknown sampler": (["--workdir={root}/teacher", "--sampler=foo"], BAD_FLAG,
                        ["--sampler"]),
    "unknown flag": (["--workdir={root}/teacher", "--num_sample=3"], BAD_FLAG,
                     ["num_sample"]),
    "a step count the student lacks": (["--workdir={root}/cd4", "--steps=2"], BAD_FLAG,
                                       ["--steps=2", "4-step"]),
    "output not writable": (["--workdir={root}/teacher", "--output={ro}/s.npz"], NOT_WRITABLE,
                            ["--output", "cannot write"]),
}


@pytest.fixture(scope="module")
def read_only_dir(tmp_path_factory):
  path = tmp_path_factory.mktemp("ro")
  os.chmod(path, 0o555)
  if os.access(path, os.W_OK):  # root writes anywhere: a path under a file instead
    os.chmod(path, 0o755)
    blocker = path / "file"
    blocker.write_text("")
    return blocker
  return path


@pytest.mark.parametrize("case", sorted(SAMPLE_CASES))
def test_sample_refuses_in_one_line(root, read_only_dir, tmp_path, case):
  args, code, fragments = SAMPLE_CASES[case]
  fill = dict(root=root, ro=read_only_dir)
  args = [a.format(**fill) for a in args]
  if not any(a.startswith("--output") for a in args):
    args.append(f"--output={tmp_path / 's.npz'}")
  proc = command("sample", *args, "--progress=false")
  one_error_line(proc, "sample", code, *fragments)
  assert not glob.glob(str(tmp_path / "*.npz"))


def test_sample_names_earlier_checkpoints_when_the_latest_is_corrupt(root, tmp_path):
  teacher = tmp_path / "teacher"
  shutil.copytree(root / "teacher", teacher)
  step_dir = os.path.join(checkpointing.checkpoint_dir(str(teacher)), "2")
  files = [f for f in glob.glob(os.path.join(step_dir, "ema", "**", "d", "*"), recursive=True)
           if os.path.isfile(f)]
  path = max(files, key=os.path.getsize)
  with open(path, "r+b") as fh:
    data = bytearray(fh.read())
    for i in range(len(data) // 2, len(data) // 2 + 8):
      data[i] ^= 0xFF
    fh.seek(0)
    fh.write(data)
  proc = command("sample", f"--workdir={teacher}", f"--output={tmp_path / 's.npz'}",
                 "--progress=false")
  one_error_line(proc, "sample", BAD_CHECKPOINT, "/2", "steps [1]", "--checkpoint_step")
  proc = command("sample", f"--workdir={teacher}", f"--output={tmp_path / 's.npz'}",
                 "--checkpoint_step=1", "--num_samples=4", "--progress=false")
  assert proc.returncode == 0, proc.stderr[-3000:]
  # Quiet by default: none of orbax's INFO lines, nor its "read only" warning for a reader;
  # --verbosity brings them back.
  assert "checkpoint_manager.py" not in proc.stderr and "read only" not in proc.stderr
  assert len(proc.stderr.splitlines()) <= 4, proc.stderr
  proc = command("sample", f"--workdir={teacher}", f"--output={tmp_path / 's.npz'}",
                 "--checkpoint_step=1", "--num_samples=4", "--progress=false",
                 "--verbosity=0")
  assert proc.returncode == 0 and "checkpoint_manager.py" in proc.stderr, proc.stderr[-3000:]


EVALUATE_CASES = {
    "no such workdir": (["--workdir={root}/nope"], BAD_FLAG, ["--workdir=", "does not exist"]),
    "not a run": (["--workdir={empty}"], BAD_FLAG, ["--workdir=", "holds no run"]),
    "no such weights": (["--workdir={root}", "--weights=ema1"], BAD_FLAG,
                        ["--weights=ema1", "['params', 'ema0']"]),
    "unknown sampler": (["--workdir={root}", "--samplers=foo"], BAD_FLAG,
                        ["--samplers=foo", "['foo']"]),
    "unknown spacing": (["--workdir={root}", "--spacing=log"], BAD_FLAG, ["--spacing=log"]),
    "steps not a number": (["--workdir={root}", "--steps=abc"], BAD_FLAG,
                           ["--steps=abc", "['abc']"]),
    "zero steps": (["--workdir={root}", "--steps=0,2"], BAD_FLAG, ["--steps=0,2"]),
    "guidance not a number": (["--workdir={root}", "--guidance=x"], BAD_FLAG, ["--guidance=x"]),
    "zero samples": (["--workdir={root}", "--num_samples=0"], BAD_FLAG,
                     ["--num_samples", "got 0"]),
    "no row to report": (["--workdir={root}/cd4", "--steps=2"], BAD_FLAG,
                         ["--steps=2", "no row to report", "(4,)"]),
    "output not writable": (["--workdir={root}", "--output={ro}/eval"], NOT_WRITABLE,
                            ["--output", "cannot write"]),
    "unknown metric": (["--workdir={root}", "--metric=psnr"], BAD_FLAG, ["--metric"]),
    "none with a metric": (["--workdir={root}", "--metric=none,fid"], BAD_FLAG,
                           ["--metric=none,fid", "alone"]),
    "fd_dinov2 without statistics": (["--workdir={root}", "--metric=fd_dinov2"], BAD_FLAG,
                                     ["--metric=fd_dinov2", "--features=dinov2"]),
    "clip without weights": (["--workdir={root}", "--metric=clip"], BAD_FLAG,
                             ["--metric=clip", "--clip_weights"]),
    "no such statistics file": (["--workdir={root}", "--metric=fid",
                                 "--reference_stats={root}/nope.npz"], BAD_FLAG,
                                ["--metric=fid", "nope.npz"]),
}


@pytest.mark.parametrize("case", sorted(EVALUATE_CASES))
def test_evaluate_refuses_in_one_line(root, read_only_dir, tmp_path, case):
  args, code, fragments = EVALUATE_CASES[case]
  (tmp_path / "empty").mkdir()
  fill = dict(root=root, ro=read_only_dir, empty=tmp_path / "empty")
  args = [a.format(**fill) for a in args]
  if not any(a.startswith("--output") for a in args):
    args.append(f"--output={tmp_path / 'eval'}")
  proc = command("evaluate", *args, "--num_samples=8" if "--num_samples" not in str(args)
                 else "--seed=0")
  one_error_line(proc, "evaluate", code, *fragments)
  assert not glob.glob(str(tmp_path / "eval*"))


def test_a_student_as_the_teacher_of_a_cd_student_is_refused(root, tmp_path):
  """Not a warning: a CD student given another student as its teacher is refused in one line
  before anything compiles, and the workdir records nothing."""
  from multistep_cm.config import checks as config_checks  # pylint: disable=g-import-not-at-top
  config = tiny_mixture("cd", steps=1, student_steps=2, teacher=str(root / "cd4"))
  with pytest.raises(config_checks.ConfigError) as info:
    train.train_and_evaluate(config, str(tmp_path / "cd2"))
  message = str(info.value)
  assert "was trained with loss.mode='cd'" in message and "\n" not in message, message
  assert "must be a 'diffusion' run" in message, message
  assert not os.path.exists(tmp_path / "cd2" / "config.json")
