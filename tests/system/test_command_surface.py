"""Every command other than `sample` and `evaluate` (test_command_inputs.py) against bad input,
as a new user would type it: each case must end with a documented non-zero exit, exactly one
line `<command>: error: ...` (`error: ...` for main and prepare) holding the fragments, and no
traceback, before anything is trained, sampled, compiled or downloaded.

The cases are few per command and most fail while the flags are parsed: each is a child
process (a few seconds, most of it imports). None needs a trained run.
"""
import os

import pytest

from helpers import REPO
from helpers import run_module

BAD_FLAG, NOT_WRITABLE = 2, 6  # docs/operations.md's table

# command -> the prefix of its error line
PREFIX = {"compile_report": "compile_report: ", "toy": "toy: ",
          "sampler_comparison": "sampler_comparison: ", "t2i_demo": "t2i_demo: ",
          "models.summary": "summary: ", "data.prepare": "", "main": ""}

# (command, flags, exit code, fragments of the line); {ro} is a directory nothing can be
# written in, {empty} an empty directory.
CASES = {
    "compile_report: a float flag given a word": (
        "compile_report", ["--config=configs/mixture_cd.py", "--steps_per_sec=abc"], BAD_FLAG,
        ["--steps_per_sec=abc"]),
    "compile_report: no such config file": (
        "compile_report", ["--config=configs/nope.py", "--topology=cpu"], BAD_FLAG,
        ["--config=configs/nope.py", "No such file"]),
    "compile_report: an unknown variant": (
        "compile_report", ["--config=configs/mixture_cd.py:foo=1", "--topology=cpu"], BAD_FLAG,
        ["unknown config argument 'foo'", "['dim', 'steps', 'teacher']"]),
    "compile_report: an override typo": (
        "compile_report", ["--config=configs/mixture_cd.py", "--config.lerning_rate=3",
                           "--topology=cpu"], BAD_FLAG, ["lerning_rate"]),
    "compile_report: a negative speed": (
        "compile_report", ["--config=configs/mixture_cd.py", "--steps_per_sec=-1",
                           "--topology=cpu"], BAD_FLAG, ["--steps_per_sec", "positive"]),
    "compile_report: a staged config": (
        "compile_report", ["--config=configs/digits_pipeline.py", "--topology=cpu"], BAD_FLAG,
        ["staged run", "['teacher', 'cd4']"]),
    "compile_report: --json not writable": (
        "compile_report", ["--config=configs/mixture_cd.py", "--topology=cpu",
                           "--json={ro}/r.json"], NOT_WRITABLE, ["--json=", "cannot write"]),
    "toy: step counts that are not numbers": (
        "toy", ["--student_steps=1,abc"], BAD_FLAG, ["--student_steps=1,abc", "['abc']"]),
    "toy: zero student steps": ("toy", ["--student_steps=0"], BAD_FLAG, ["--student_steps=0"]),
    "toy: a zero batch": ("toy", ["--batch=0"], BAD_FLAG, ["--batch", "got 0"]),
    "toy: an unknown mode": ("toy", ["--modes=cd,foo"], BAD_FLAG, ["--modes=cd,foo", "['foo']"]),
    "toy: a stray argument": ("toy", ["extra"], BAD_FLAG, ["unexpected arguments", "extra"]),
    "toy: --json not writable": ("toy", ["--json={ro}/t.json"], NOT_WRITABLE,
                                 ["--json=", "cannot write"]),
    "sampler_comparison: a budget that is not a number": (
        "sampler_comparison", ["--nfe=4,abc"], BAD_FLAG, ["--nfe=4,abc", "['abc']"]),
    "sampler_comparison: an unknown sampler": (
        "sampler_comparison", ["--samplers=ddim,foo"], BAD_FLAG, ["--samplers", "['foo']"]),
    "sampler_comparison: zero samples": (
        "sampler_comparison", ["--num_samples=0"], BAD_FLAG, ["--num_samples", "got 0"]),
    "sampler_comparison: digits without a run": (
        "sampler_comparison", ["--data=digits"], BAD_FLAG, ["--data=digits needs --workdir"]),
    "t2i_demo: no such workdir": (
        "t2i_demo", ["--workdir={empty}/nope"], BAD_FLAG, ["--workdir=", "does not exist"]),
    "t2i_demo: a guidance scale that is not a number": (
        "t2i_demo", ["--workdir={empty}", "--guidance=0,x"], BAD_FLAG, ["--guidance=0,x"]),
    "t2i_demo: a directory without runs": (
        "t2i_demo", ["--workdir={empty}"], BAD_FLAG, ["--workdir=", "holds no run"]),
    "summary: an unknown preset": (
        "models.summary", ["--preset=foo"], BAD_FLAG, ["--preset", "digits8"]),
    "summary: a zero batch": (
        "models.summary", ["--preset=digits8", "--batch=0"], BAD_FLAG, ["--batch", "got 0"]),
    "summary: a staged config": (
        "models.summary", ["--config=configs/digits_pipeline.py"], BAD_FLAG,
        ["staged run", "['teacher', 'cd4']"]),
    "summary: no such config file": (
        "models.summary", ["--config=configs/nope.py"], BAD_FLAG, ["--config=configs/nope.py"]),
    "prepare: a dataset TFDS does not have": (
        "data.prepare", ["--dataset=nope_dataset", "--data_dir={empty}"], BAD_FLAG,
        ["--dataset=nope_dataset", "no such dataset"]),
    "prepare: a config the dataset does not have": (
        "data.prepare", ["--dataset=imagenet_resized/99x99", "--data_dir={empty}"], BAD_FLAG,
        ["imagenet_resized/99x99", "'64x64'"]),
    "prepare: ImageNet without its archives": (
        "data.prepare", ["--dataset=imagenet2012", "--data_dir={empty}",
                         "--manual_dir={empty}/tars"], BAD_FLAG,
        ["--manual_dir=", "ILSVRC2012_img_train.tar"]),
    "prepare: a data_dir that cannot be written": (
        "data.prepare", ["--dataset=imagenet2012", "--data_dir={ro}/tfds"], NOT_WRITABLE,
        ["--data_dir", "cannot write"]),
    "main: a stray argument": (
        "main", ["--config=configs/mixture_cd.py", "--workdir={empty}/run", "extra"], BAD_FLAG,
        ["unexpected arguments", "extra"]),
}


@pytest.fixture(scope="module")
def dirs(tmp_path_factory):
  """`ro`: nothing can be created in it (for root, who writes anywhere: a path under a
  file); `empty`: an empty directory."""
  ro = tmp_path_factory.mktemp("ro")
  os.chmod(ro, 0o555)
  if os.access(ro, os.W_OK):
    os.chmod(ro, 0o755)
    ro = ro / "file"
    ro.write_text("")
  return {"ro": ro, "empty": tmp_path_factory.mktemp("empty")}


@pytest.mark.parametrize("case", sorted(CASES))
def test_a_bad_input_is_one_line(dirs, case):
  command, args, code, fragments = CASES[case]
  proc = run_module(f"multistep_cm.{command}", *(a.format(**dirs) for a in args),
                    check=False, timeout=120)
  stderr = proc.stderr
  assert (proc.returncode, "Traceback" in stderr) == (code, False), stderr[-3000:]
  errors = [line for line in stderr.splitlines() if "error:" in line]
  assert len(errors) == 1, stderr[-3000:]
  assert errors[0].startswith(f"{PREFIX[command]}error: "), errors
  missing = [f for f in fragments if f not in errors[0]]
  assert not missing, (missing, errors[0])
  assert os.listdir(dirs["empty"]) == []  # nothing written, not even the workdir


def test_main_help_lists_the_shipped_configs_and_how_to_override():
  proc = run_module("multistep_cm.main", "--help", check=False, timeout=120)
  assert (proc.returncode, "Traceback" in proc.stderr) == (0, False), proc.stderr[-3000:]
  lines = proc.stdout.splitlines()
  shipped = sorted(f for f in os.listdir(os.path.join(REPO, "configs")) if f.endswith(".py"))
  listed = {line.split()[0]: line for line in lines if line.startswith("  ")
            and line.split()[0].endswith(".py")}
  assert sorted(listed) == shipped
  # Read from the files as a user would: the docstring's variants, else get_config's keys.
  assert "size=8|16" in listed["digits_diffusion.py"]
  assert "size=small|large, steps=1|2|4|8|16, teacher=PATH" in listed["imagenet64_cd.py"]
  assert "steps=8, teacher='', dim=8" in listed["mixture_cd.py"]
  assert any("--config.key=value" in line and "config.json" in line for line in lines)
  assert "--workdir" in proc.stdout  # the flags too
  assert run_module("multistep_cm.main", "--config_help", check=False,
                    timeout=120).stdout == proc.stdout
