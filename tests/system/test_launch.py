"""Launch scripts: shellcheck, and what their dry runs would execute.

Dry-run output is read back with shlex, so the checks are on the argv each
command would get. Fake gcloud/srun/tensorboard binaries come first on PATH and
record any call: a dry run that executes something fails the test.
"""
import os
import pathlib
import re
import shlex
import shutil
import signal
import subprocess
import time

import pytest

import helpers

REPO = pathlib.Path(helpers.REPO)
LAUNCH = REPO / "launch"
SCRIPTS = sorted(p for p in LAUNCH.iterdir() if p.suffix in (".sh", ".sbatch"))

# Settings the scripts read from the environment; a developer's shell may hold
# some, so every test starts without them.
_SETTINGS = {
    "PROJECT_ID", "ZONE", "TPU_NAME", "ACCELERATOR_TYPE", "RUNTIME_VERSION", "QUEUED",
    "QR_NAME", "SPOT", "PREEMPTIBLE", "REPO_URL", "REPO_COMMIT", "REMOTE_DIR", "VENV_DIR",
    "PYTHON_VERSION", "CONFIG", "WORKDIR", "TFDS_DATA_DIR", "EXTRA_ENV", "LOG_DIR",
    "WORKER", "LOG_LINES", "STOP_TIMEOUT", "TB_PORT", "TB_REMOTE", "YES", "DRY_RUN",
    "GCLOUD", "TENSORBOARD", "OVERRIDES", "GPUS", "PYTHON", "SRUN_ARGS", "REPO_DIR",
    "JAX_COORDINATOR_ADDRESS", "JAX_NUM_PROCESSES", "JAX_PROCESS_ID",
}

POD = ["--tpu-name=mcm-small", "--zone=us-west4-a", "--project=my-project"]
TRAIN = POD + [
    "--config=configs/imagenet64_diffusion.py:size=small",
    "--workdir=gs://my-bucket/mcm/in64_small",
    "--tfds-data-dir=gs://my-bucket/tfds",
    "--config.batch_size=2048",
]
MAIN = [
    "-m", "multistep_cm.main",
    "--config=configs/imagenet64_diffusion.py:size=small",
    "--workdir=gs://my-bucket/mcm/in64_small",
    "--config.batch_size=2048",
]


@pytest.fixture
def env(tmp_path):
  fake_bin = tmp_path / "bin"
  fake_bin.mkdir()
  marker = tmp_path / "executed"
  for tool in ("gcloud", "srun", "sbatch", "tensorboard"):
    fake = fake_bin / tool
    fake.write_text(f'#!/bin/sh\necho "{tool} $*" >> "{marker}"\nexit 97\n')
    fake.chmod(0o755)
  clean = {k: v for k, v in os.environ.items()
           if k not in _SETTINGS and not k.startswith("SLURM_")}
  clean.update(PATH=f"{fake_bin}{os.pathsep}{os.environ['PATH']}", TMPDIR=str(tmp_path))
  yield clean
  assert not marker.exists(), "a dry run executed: " + marker.read_text()


def run_script(env, script, *args, extra_env=None, ok=True, cwd=REPO):
  """`bash launch/<script> args...` in `env` (the `env` fixture's, plus `extra_env`)."""
  result = subprocess.run(
      ["bash", str(LAUNCH / script), *args], env={**env, **(extra_env or {})}, cwd=cwd,
      capture_output=True, text=True, timeout=30)
  if ok:
    assert result.returncode == 0, result.stderr
  return result


def commands(stdout):
  return [shlex.split(line) for line in stdout.splitlines()]


def remote_command(argv):
  """The --command= value of a gcloud ssh argv."""
  (value,) = [a[len("--command="):] for a in argv if a.startswith("--command=")]
  return value


def tpu(env, *args, **kwargs):
  return run_script(env, "tpu.sh", "--dry-run", *args, **kwargs)


# ---------------------------------------------------------------------------
# shellcheck


def test_scripts_pass_shellcheck():
  if shutil.which("shellcheck") is None:
    pytest.skip("shellcheck binary not found (pip install -c constraints.txt -e '.[test]')")
  assert {p.name for p in SCRIPTS} >= {"tpu.sh", "common.sh", "gpu_slurm.sbatch",
                                       "gpu_single_node.sh"}
  result = subprocess.run(["shellcheck", "-x", *map(str, SCRIPTS)], cwd=REPO,
                          capture_output=True, text=True, timeout=60)
  assert result.returncode == 0, result.stdout + result.stderr


@pytest.mark.parametrize("script", ["tpu.sh", "gpu_single_node.sh", "gpu_slurm.sbatch"])
def test_usage_lists_every_flag_and_env_var(env, script):
  # The flags each script accepts are the patterns of its flag_target (and the
  # shared trainer_flag_target); each flag and the variable it sets must be in --help.
  text = (LAUNCH / script).read_text() + (LAUNCH / "common.sh").read_text()
  pairs = re.findall(r"^\s+(--[a-z-]+)\) echo \+?([A-Z_]+)", text, re.M)
  assert len(pairs) >= 5
  help_text = run_script(env, script, "--help").stdout
  for flag, var in pairs:
    assert flag in help_text and var in help_text, (flag, var)


# ---------------------------------------------------------------------------
# tpu.sh


def test_train_starts_the_same_detached_command_on_every_worker(env):
  out = commands(tpu(env, "train", *TRAIN, "--env", "LIBTPU_INIT_ARGS=--xla_x=true",
                     "--", "--config.name=two words").stdout)
  assert len(out) == 1, "one ssh reaches every worker; no per-worker commands"
  (argv,) = out
  assert argv[:6] == ["gcloud", "compute", "tpus", "tpu-vm", "ssh", "mcm-small"]
  assert "--worker=all" in argv
  assert "--zone=us-west4-a" in argv and "--project=my-project" in argv
  cmd = remote_command(argv)
  # Detached: own session, immune to hangup, no terminal fds, in the background.
  m = re.search(r"setsid nohup (.*?) >> (\S+) 2>&1 < /dev/null &", cmd)
  assert m, cmd
  trainer = shlex.split(m.group(1))
  assert trainer[0] == "env"
  assert "TFDS_DATA_DIR=gs://my-bucket/tfds" in trainer
  assert "LIBTPU_INIT_ARGS=--xla_x=true" in trainer
  python = trainer.index("-m") - 1
  assert trainer[python] == "$HOME/multistep_cm_venv/bin/python"
  assert trainer[python + 1:] == MAIN + ["--config.name=two words"]
  # One log file per worker, named by the worker's own hostname.
  log = m.group(2)
  assert "worker-" in log and "$(hostname)" in log
  assert 'cd "$HOME"/multistep_cm' in cmd  # config paths are repo-relative


def test_settings_from_environment_equal_flags(env):
  from_flags = tpu(env, "train", *TRAIN).stdout
  from_env = tpu(env, "train", "--config.batch_size=2048", extra_env={
      "TPU_NAME": "mcm-small", "ZONE": "us-west4-a", "PROJECT_ID": "my-project",
      "CONFIG": "configs/imagenet64_diffusion.py:size=small",
      "WORKDIR": "gs://my-bucket/mcm/in64_small", "TFDS_DATA_DIR": "gs://my-bucket/tfds"}).stdout
  assert from_flags == from_env
  via_overrides = tpu(env, "train", *TRAIN[:-1],
                      extra_env={"OVERRIDES": "--config.batch_size=2048"}).stdout
  assert via_overrides == from_flags


@pytest.mark.parametrize("accelerator, runtime", [
    ("v4-32", "tpu-ubuntu2204-base"),
    ("v5litepod-64", "v2-alpha-tpuv5-lite"),
    ("v5p-128", "v2-alpha-tpuv5"),
    ("v6e-256", "v2-alpha-tpuv6e"),
])
def test_create_picks_runtime_per_generation(env, accelerator, runtime):
  (argv,) = commands(tpu(env, "create", *POD, f"--accelerator-type={accelerator}").stdout)
  assert argv == ["gcloud", "compute", "tpus", "tpu-vm", "create", "mcm-small",
                  "--zone=us-west4-a", "--project=my-project",
                  f"--accelerator-type={accelerator}", f"--version={runtime}"]
  (argv,) = commands(tpu(env, "create", *POD, f"--accelerator-type={accelerator}",
                         "--queued", "--spot").stdout)
  assert argv == ["gcloud", "compute", "tpus", "queued-resources", "create", "mcm-small-qr",
                  "--zone=us-west4-a", "--project=my-project", "--node-id=mcm-small",
                  f"--accelerator-type={accelerator}", f"--runtime-version={runtime}",
                  "--spot"]


def test_create_honours_explicit_runtime_and_capacity_flags(env):
  (argv,) = commands(tpu(env, "create", *POD, "--accelerator-type=v5litepod-256",
                         "--runtime-version=v2-alpha-tpuv5-lite-next", "--preemptible").stdout)
  assert "--version=v2-alpha-tpuv5-lite-next" in argv and argv[-1] == "--preemptible"
  (argv,) = commands(tpu(env, "create", *POD, "--accelerator-type=v5litepod-64", "--queued",
                         "--qr-name=my-queue").stdout)
  assert argv[5] == "my-queue" and "--spot" not in argv


def test_setup_installs_the_pinned_versions_on_every_worker(env):
  out = commands(tpu(env, "setup", *POD, "--repo-url=https://example.com/mcm.git",
                     "--repo-commit=0123abcd").stdout)
  (argv,) = out
  assert argv[4] == "ssh" and "--worker=all" in argv
  steps = remote_command(argv).split("; ")
  assert 'git -C "$HOME"/multistep_cm checkout -q 0123abcd' in remote_command(argv)
  # A fresh venv of the Python that constraints.txt was resolved for, then the
  # pinned install from the repository root.
  assert shlex.split(next(s for s in steps if " -m venv " in s)) == [
      "python3.11", "-m", "venv", "--clear", "$HOME/multistep_cm_venv"]
  pip = steps.index(next(s for s in steps if "pip install" in s))
  assert shlex.split(steps[pip - 1]) == ["cd", "$HOME/multistep_cm"]
  assert shlex.split(steps[pip]) == [
      "$HOME/multistep_cm_venv/bin/python", "-m", "pip", "install", "-q",
      "-c", "constraints.txt", "-e", ".[tpu]"]


def test_setup_ships_the_local_head_to_every_worker(env):
  head = subprocess.run(["git", "-C", str(REPO), "rev-parse", "--verify", "HEAD"],
                        capture_output=True, text=True)
  if head.returncode != 0:
    pytest.skip("not a git checkout")
  archive, scp, _, ssh = commands(tpu(env, "setup", *POD).stdout)
  tarball = archive[archive.index("archive") + 2][len("--output="):]
  assert archive[:4] == ["git", "-C", str(REPO), "archive"] and archive[-1] == "HEAD"
  assert scp[4:7] == ["scp", tarball, "mcm-small:multistep_cm-src.tar.gz"]
  assert "--worker=all" in scp and "--worker=all" in ssh
  assert f"echo {head.stdout.strip()} > \"$HOME\"/multistep_cm/REVISION" in remote_command(ssh)


def test_stop_sends_sigterm_then_sigkill_after_the_timeout(env):
  (argv,) = commands(tpu(env, "stop", *POD, "--stop-timeout=120").stdout)
  assert "--worker=all" in argv
  cmd = remote_command(argv)
  assert 0 <= cmd.index("kill -s TERM") < cmd.index('-lt 120') < cmd.index("kill -s KILL")


def test_logs_follow_worker_zero_or_all(env):
  (argv,) = commands(tpu(env, "logs", *POD).stdout)
  assert "--worker=0" in argv and "tail -n 100 -F" in remote_command(argv)
  (argv,) = commands(tpu(env, "logs", *POD, "--worker=all").stdout)
  assert "--worker=all" in argv


def test_tensorboard_local_and_forwarded(env):
  (argv,) = commands(tpu(env, "tensorboard", "--workdir=gs://b/run").stdout)
  assert argv == ["tensorboard", "--logdir=gs://b/run", "--port=6006"]
  (argv,) = commands(tpu(env, "tensorboard", *POD, "--workdir=gs://b/run", "--remote").stdout)
  assert "--worker=0" in argv and argv[-3:] == ["--", "-L", "6006:localhost:6006"]


def test_delete_tpu_or_queued_resource(env):
  (argv,) = commands(tpu(env, "delete", *POD).stdout)
  assert argv[:6] == ["gcloud", "compute", "tpus", "tpu-vm", "delete", "mcm-small"]
  (argv,) = commands(tpu(env, "delete", *POD, "--queued", "--yes").stdout)
  assert argv[3:6] == ["queued-resources", "delete", "mcm-small-qr"]
  assert "--force" in argv and "--quiet" in argv


@pytest.mark.parametrize("args, missing", [
    (["train", *[a for a in TRAIN if not a.startswith("--workdir")]], "WORKDIR"),
    (["train", *[a for a in TRAIN if not a.startswith("--zone")]], "ZONE"),
    (["train", *[a for a in TRAIN if not a.startswith("--tpu-name")]], "TPU_NAME"),
    (["train", *[a for a in TRAIN if not a.startswith("--config=")]], "CONFIG"),
    (["create", *POD], "ACCELERATOR_TYPE"),
    (["setup", *POD, "--repo-url=https://example.com/mcm.git"], "REPO_COMMIT"),
])
def test_missing_setting_is_one_error_line(env, args, missing):
  result = tpu(env, *args, ok=False)
  assert result.returncode != 0 and result.stdout == ""
  (line,) = result.stderr.splitlines()
  assert "error" in line and missing in line


@pytest.mark.parametrize("args, word", [
    (["train", *TRAIN, "--workdir=/tmp/run"], "gs://"),
    (["create", *POD, "--accelerator-type=v9-8"], "--runtime-version"),
    (["create", *POD, "--accelerator-type=v5litepod-64", "--queued", "--preemptible"],
     "--spot"),
    (["train", *TRAIN, "--bogus"], "--bogus"),
])
def test_invalid_setting_is_one_error_line(env, args, word):
  result = tpu(env, *args, ok=False)
  assert result.returncode != 0 and result.stdout == ""
  (line,) = result.stderr.splitlines()
  assert word in line


def _remote_sh(env, home, *args):
  """Runs tpu.sh's worker command for this machine, as gcloud would on a worker."""
  (argv,) = commands(tpu(env, *args, *POD).stdout)
  return subprocess.run(["sh", "-c", remote_command(argv)], env={**env, "HOME": str(home)},
                        capture_output=True, text=True, timeout=30)


def _gone(pid):
  """True when pid has exited (a zombie counts: here nobody may reap orphans)."""
  try:
    with open(f"/proc/{pid}/stat") as f:
      return f.read().rsplit(")", 1)[1].split()[0] == "Z"
  except FileNotFoundError:
    return True


@pytest.mark.skipif(not os.path.isdir("/proc/self") or shutil.which("hostname") is None,
                    reason="needs /proc and hostname, as on a TPU VM")
@pytest.mark.parametrize("handles_sigterm", [True, False])
def test_worker_commands_detach_then_stop(env, tmp_path, handles_sigterm):
  # A stand-in trainer in the worker layout: records its arguments, and either
  # exits on SIGTERM (saving a checkpoint) or ignores it (a hung save).
  home = tmp_path / "home"
  (home / "multistep_cm").mkdir(parents=True)
  python = home / "multistep_cm_venv" / "bin" / "python"
  python.parent.mkdir(parents=True)
  on_term = 'echo saved; exit 0' if handles_sigterm else 'echo ignored'
  python.write_text(f"#!/bin/sh\necho \"args: $*\"\ntrap '{on_term}' TERM\n"
                    "while :; do sleep 0.05; done\n")
  python.chmod(0o755)
  pidfile = home / "multistep_cm_logs" / "train.pid"
  try:
    started = _remote_sh(env, home, "train", *TRAIN[3:])
    assert started.returncode == 0, started.stderr  # returned: the trainer is detached
    pid = int(pidfile.read_text())
    # Wait until the stand-in runs (its first line is in the log): until then the
    # child may be inside one of its execs (setsid, nohup, the interpreter), where
    # /proc/PID/cmdline reads empty for a moment and the guard below cannot see it.
    log_dir = home / "multistep_cm_logs"
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and not any(
        "args: " in f.read_text() for f in log_dir.glob("worker-*.log")):
      time.sleep(0.02)
    assert os.getpgid(pid) == pid  # leads its own process group
    again = _remote_sh(env, home, "train", *TRAIN[3:])
    assert again.returncode != 0 and "running" in again.stderr
    time.sleep(0.3)
    # A trainer that exits on SIGTERM is not waited for until the timeout; one
    # that does not is killed once the timeout has passed.
    timeout = 20 if handles_sigterm else 1
    t0 = time.monotonic()
    stopped = _remote_sh(env, home, "stop", f"--stop-timeout={timeout}")
    elapsed = time.monotonic() - t0
    assert stopped.returncode == 0, stopped.stderr
    assert ("SIGKILL" in stopped.stdout) != handles_sigterm
    assert elapsed < 5 if handles_sigterm else elapsed >= timeout
    assert _gone(pid)
    (log,) = (home / "multistep_cm_logs").glob("worker-*.log")
    text = log.read_text()
    assert "args: " + " ".join(MAIN) in text
    assert ("saved" in text) == handles_sigterm
  finally:
    if pidfile.exists():
      try:
        os.killpg(int(pidfile.read_text()), signal.SIGKILL)
      except ProcessLookupError:
        pass


# ---------------------------------------------------------------------------
# GPU launchers


def test_slurm_dry_run_runs_the_trainer_on_every_task(env):
  result = run_script(env, "gpu_slurm.sbatch", "--config.batch_size=2048", extra_env={
      "DRY_RUN": "1", "CONFIG": "configs/imagenet64_diffusion.py:size=small",
      "WORKDIR": "gs://my-bucket/mcm/in64_small", "TFDS_DATA_DIR": "gs://my-bucket/tfds"})
  cd, srun = commands(result.stdout)
  assert cd == ["cd", str(REPO)]
  assert srun[:3] == ["srun", "--kill-on-bad-exit=1", "--label"]
  # SLURM's own variables drive jax.distributed, not leftover coordinator ones.
  assert srun[srun.index("env"):srun.index("python")] == [
      "env", "-u", "JAX_COORDINATOR_ADDRESS", "-u", "JAX_NUM_PROCESSES",
      "-u", "JAX_PROCESS_ID", "TFDS_DATA_DIR=gs://my-bucket/tfds"]
  assert srun[srun.index("python") + 1:] == MAIN


def test_slurm_asks_for_one_task_per_gpu(env):
  header = dict(re.findall(r"^#SBATCH --([a-z-]+)=(\S+)", (LAUNCH / "gpu_slurm.sbatch").read_text(),
                           re.M))
  assert header["ntasks-per-node"] == header["gpus-per-node"]
  assert "gpus-per-task" not in header  # each task must see all the node's GPUs
  result = run_script(env, "gpu_slurm.sbatch", "--config=configs/x.py", "--workdir=/shared/w",
                      extra_env={"DRY_RUN": "1", "SLURM_NTASKS_PER_NODE": "8",
                                 "SLURM_GPUS_ON_NODE": "4"}, ok=False)
  assert result.returncode != 0 and len(result.stderr.splitlines()) == 1
  assert "one task per GPU" in result.stderr


def test_single_node_dry_run_drives_all_gpus_from_one_process(env, tmp_path):
  result = run_script(env, "gpu_single_node.sh", "--dry-run",
                      "--config=configs/imagenet64_diffusion.py:size=small", "--workdir=runs/in64",
                      "--gpus=0,1,2,3", "--config.batch_size=2048", cwd=tmp_path)
  cd, argv = commands(result.stdout)
  assert cd == ["cd", str(REPO)]
  assert argv[0] == "env" and "CUDA_VISIBLE_DEVICES=0,1,2,3" in argv
  # The relative workdir is the caller's, made absolute before the cd.
  assert argv[argv.index("python") + 1:] == [
      "-m", "multistep_cm.main", "--config=configs/imagenet64_diffusion.py:size=small",
      f"--workdir={tmp_path}/runs/in64", "--config.batch_size=2048"]
  missing = run_script(env, "gpu_single_node.sh", "--dry-run", "--config=configs/x.py", ok=False)
  assert missing.returncode != 0 and len(missing.stderr.splitlines()) == 1
  assert "WORKDIR" in missing.stderr
