"""The main job: `python -m multistep_cm.main --config=configs/<name>.py --workdir=DIR`.

Parses flags, starts `jax.distributed` on multi-host runs, logs the devices,
validates the config (every stage of a staged one) and calls `train.run(config,
workdir)`. Re-running with the same workdir resumes from its latest complete
checkpoint; `--config=<workdir>/config.json` (the run's resolved config) replays it. Every failure below ends with one line `error: ...` on stderr and its
exit code, not a traceback; an unexpected error still shows its traceback (exit 1).

Exit codes:
  0   finished (num_train_steps reached)
  2   bad config or command line (one line names the key and what is allowed), or a
      resume that changes a key the workdir's checkpoints depend on (model, schedule,
      objective, data shape)
  3   dataset missing, unprepared or corrupt (the message names the fixing command)
  4   checkpoint missing or incompatible (teacher, init_from, or the workdir's own)
  5   stopped on a non-finite loss or gradient (config.nonfinite='stop')
  6   the workdir cannot be written (read-only, full, over quota)
  75  stopped by SIGTERM/SIGINT after saving a checkpoint at the current step (in
      multi-process jobs: a SIGTERM to any process, through JAX's preemption sync
      point, stops all at one step): run the same command again to resume (75 is
      EX_TEMPFAIL, "try again")
  130 a second SIGINT (Ctrl-C) while the first one's stop was under way: stopped at once,
      without a new checkpoint; the last complete one is intact
"""
import json
import logging as std_logging
import os
import re
import sys

from absl import app
from absl import flags
from absl import logging
import ml_collections
from ml_collections import config_flags

EXIT_CONFIG, EXIT_DATA, EXIT_CHECKPOINT, EXIT_NONFINITE, EXIT_WORKDIR = 2, 3, 4, 5, 6
EXIT_PREEMPTED = 75
EXIT_INTERRUPTED = 130  # 128 + SIGINT, as a shell reports a Ctrl-C

_CONFIG = config_flags.DEFINE_config_file(
    "config", None, "Experiment config file (configs/<name>.py[:variant]), or a run's "
    "<workdir>/config.json to replay it; --config.key=value overrides either.",
    lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Directory for checkpoints, logs, config.")
_COORDINATOR = flags.DEFINE_string(
    "coordinator_address", None, "host:port of process 0 for multi-process runs without "
    "cluster auto-detection (else JAX_COORDINATOR_ADDRESS, SLURM or a TPU pod are used).")
_NUM_PROCESSES = flags.DEFINE_integer("num_processes", None, "With --coordinator_address.")
_PROCESS_ID = flags.DEFINE_integer("process_id", None, "With --coordinator_address.")
_DISTRIBUTED = flags.DEFINE_enum(
    "distributed", "auto", ["auto", "on", "off"],
    "Start jax.distributed: auto = on TPU VMs, under multi-task SLURM, or when "
    "JAX_COORDINATOR_ADDRESS is set.")
flags.mark_flags_as_required(["config", "workdir"])


def _from_json(value):
  """A `config.json` value as the config file had it: lists as tuples (JSON has no tuples),
  nested dicts as ConfigDicts, and None as a field any override may set."""
  if isinstance(value, dict):
    return ml_collections.ConfigDict({k: _from_json(v) for k, v in value.items()})
  if isinstance(value, list):
    return tuple(_from_json(v) for v in value)
  if value is None:  # typed only by what an override gives it (data.data_dir, image_size)
    return ml_collections.FieldReference(None, field_type=object)
  return value


class _ConfigFileOrJson(flags.ArgumentParser):
  """`--config=`: a config file, parsed by ml_collections' own parser, or a `.json` path, a
  run's `<workdir>/config.json` (the resolved config `training/loop.py` writes, every
  default filled), loaded as a ConfigDict: `--config=<workdir>/config.json` replays that
  run. `--config.key=value` overrides apply to both."""

  def __init__(self, file_parser):
    self._file_parser = file_parser

  def parse(self, argument):
    if not (isinstance(argument, str) and argument.endswith(".json")):
      return self._file_parser.parse(argument)
    from etils import epath  # pylint: disable=g-import-not-at-top
    try:
      config = _from_json(json.loads(epath.Path(argument).read_text()))
    except (OSError, ValueError) as e:
      raise ValueError(f"--config={argument}: {e}") from None  # one line (_parse_flags)
    if not isinstance(config, ml_collections.ConfigDict):
      raise ValueError(f"--config={argument}: not a JSON object (a run's config.json is one)")
    config.lock()
    return config

  def flag_type(self):
    return self._file_parser.flag_type()


flags.FLAGS[_CONFIG.name].parser = _ConfigFileOrJson(flags.FLAGS[_CONFIG.name].parser)


def _multi_host_environment() -> bool:
  """True where `jax.distributed.initialize()` can find its peers by itself.

  On a Cloud TPU VM JAX reads the slice's workers from the VM metadata; the device
  files identify such a VM (initialising a single-host slice is harmless).
  """
  env = os.environ
  if env.get("JAX_COORDINATOR_ADDRESS"):
    return True
  if int(env.get("SLURM_NTASKS", "1") or 1) > 1 and "SLURM_JOB_ID" in env:
    return True
  if len([h for h in env.get("TPU_WORKER_HOSTNAMES", "").split(",") if h]) > 1:
    return True
  return any(os.path.exists(p) for p in ("/dev/accel0", "/dev/vfio/0"))


def initialize_distributed():
  import jax  # pylint: disable=g-import-not-at-top
  mode = _DISTRIBUTED.value
  if _COORDINATOR.value:
    jax.distributed.initialize(_COORDINATOR.value, _NUM_PROCESSES.value, _PROCESS_ID.value)
  elif mode == "on" or (mode == "auto" and _multi_host_environment()):
    jax.distributed.initialize()


def _parse_flags(argv):
  """absl's parsing, but a bad flag, config file or override exits 2 with one line."""
  try:
    remaining = flags.FLAGS(argv)
    _CONFIG.value.keys()  # a config file that failed to load says so on first use
    return remaining
  except (AttributeError, KeyError) as e:  # ml_collections: an override of an unknown key
    # At any depth: a nested key's KeyError arrives wrapped in an AttributeError, its text
    # "'key'\nDid you mean "other" instead of "key"?".
    inner = e.args[0] if e.args else e
    text = str(inner.args[0] if isinstance(inner, BaseException) and inner.args else inner)
    key = text.splitlines()[0].strip("\"'") if text else type(e).__name__
    suggestion = re.search(r'Did you mean "([^"]+)"', text)
    given = [a.split("=")[0] for a in argv if a.startswith("--config.")
             and key in a.split("=")[0].split(".")]
    print(f"error: {given[0] if given else key}: the config has no key {key!r}"
          f"{f' (did you mean {suggestion.group(1)!r}?)' if suggestion else ''}",
          file=sys.stderr)
  except Exception as e:  # pylint: disable=broad-except
    # A config file's own error arrives with its traceback as text: its last line says it.
    lines = [line.strip() for line in str(e).splitlines() if line.strip()]
    print(f"error: {lines[-1] if lines else type(e).__name__}", file=sys.stderr)
  sys.exit(EXIT_CONFIG)


class _NoLibraryTracebacks(std_logging.Filter):
  """Drops the tracebacks logged for a background save that failed.

  Orbax logs them from each of its threads, and asyncio again for the save's tasks
  nobody awaits any more (only orbax runs asyncio here). The exception itself is
  re-raised in the main thread, where `main` turns a full or read-only disk into one
  line and exit 6 (any other error keeps its traceback there); the logged copies
  would bury that line. The log lines themselves stay.
  """

  def filter(self, record):
    if record.exc_info and any(f"{os.sep}{lib}{os.sep}" in record.pathname
                               for lib in ("orbax", "asyncio")):
      record.exc_info, record.exc_text = None, None
    return True


def _quiet_abandoned_writes(previous_hook):
  """An unraisable-exception hook that drops tensorstore's reports of a failed save's
  other writes.

  After one write of an orbax save fails (a full disk), orbax closes the save's event
  loop; tensorstore then reports each write still finishing as an unraisable
  RuntimeError: dozens of tracebacks that say nothing beyond the error main reports.
  """
  def hook(unraisable):
    if (unraisable.exc_type is RuntimeError
        and str(unraisable.exc_value) == "Event loop is closed"):
      return
    previous_hook(unraisable)
  return hook


def _fail(code: int, message: str):
  if flags.FLAGS.log_dir:  # else absl logs to stderr, which gets the line below already
    logging.error("%s", message)
  print(f"error: {message}", file=sys.stderr)
  sys.exit(code)


def main(argv):
  if len(argv) > 1:
    _fail(EXIT_CONFIG, f"unexpected arguments: {argv[1:]} (flags are --name=value)")
  logging.get_absl_handler().addFilter(_NoLibraryTracebacks())
  sys.unraisablehook = _quiet_abandoned_writes(sys.unraisablehook)
  initialize_distributed()
  # Imported after jax.distributed starts: nothing may touch a JAX backend before it.
  import jax  # pylint: disable=g-import-not-at-top
  from multistep_cm.config import checks as config_checks  # pylint: disable=g-import-not-at-top
  config, workdir = _CONFIG.value, _WORKDIR.value
  try:
    # Before the trainer is even imported: a bad config fails in seconds.
    config_checks.validate_run(config, jax.device_count(), jax.process_count())
  except config_checks.ConfigError as e:
    _fail(EXIT_CONFIG, str(e))
  from multistep_cm.data import sources  # pylint: disable=g-import-not-at-top
  from multistep_cm.runtime import checkpointing  # pylint: disable=g-import-not-at-top
  from multistep_cm.training import loop as train  # pylint: disable=g-import-not-at-top
  checkpointing.quiet_orbax_logs()  # unless --verbosity asks for orbax's INFO lines

  logging.info("JAX %s, process %d of %d, %d local / %d global devices: %s", jax.__version__,
               jax.process_index(), jax.process_count(), jax.local_device_count(),
               jax.device_count(), jax.devices()[0].device_kind)
  try:
    result = train.run(config, workdir)
  except KeyboardInterrupt:  # a second Ctrl-C: the trainer's handler let it through
    _fail(EXIT_INTERRUPTED, "interrupted (a second Ctrl-C, or one before training set up "
          "its handler): stopped at once without saving; the last complete checkpoint is "
          "intact, run the same command to resume")
  except config_checks.ConfigError as e:
    _fail(EXIT_CONFIG, str(e))
  except sources.DatasetError as e:
    _fail(EXIT_DATA, str(e))
  except checkpointing.CheckpointError as e:
    _fail(EXIT_CHECKPOINT, str(e))
  except train.NonFiniteError as e:
    _fail(EXIT_NONFINITE, str(e))
  except OSError as e:
    if e.errno in checkpointing.WORKDIR_ERRNOS:
      path = str(e.filename or workdir)
      what = (f"cannot write to the workdir {workdir!r}" if path.startswith(str(workdir))
              else f"cannot access {path!r}")
      _fail(EXIT_WORKDIR, f"{what}: {e.strerror} ({path}). Checkpoints saved before are "
            "intact: free space or fix the permissions, then run the same command to resume.")
    raise
  if result.preempted:
    sys.exit(EXIT_PREEMPTED)


if __name__ == "__main__":
  app.run(main, flags_parser=_parse_flags)
