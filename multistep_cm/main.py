"""The main job: `python -m multistep_cm.main --config=configs/<name>.py --workdir=DIR`.

Parses flags, starts `jax.distributed` on multi-host runs, logs the devices,
validates the config (every stage of a staged one) and calls `train.run(config,
workdir)`. Re-running with the same workdir resumes from its latest complete
checkpoint; `--config=<workdir>/config.json` (the run's resolved config) replays it.
`--help` (or `--config_help`) lists the shipped configs with their variants. Every failure
below ends with one line `error: ...` on stderr and its exit code, not a traceback; an
unexpected error still shows its traceback (exit 1).

Exit codes:
  0   finished (num_train_steps reached)
  2   bad config or command line (one line names the key and what is allowed), or a
      resume that changes a key the workdir's checkpoints depend on (model, schedule,
      objective, data shape)
  3   dataset missing, unprepared or corrupt (the message names the fixing command)
  4   checkpoint missing or incompatible (teacher, init_from, or the workdir's own)
  5   stopped on a non-finite loss or gradient (config.nonfinite='stop')
  6   the workdir cannot be written (read-only, full, over quota)
  7   another run is training in the workdir (it holds <workdir>/.lock; the lock goes
      with that process, however it ends): nothing was changed
  75  stopped by SIGTERM/SIGINT after saving a checkpoint at the current step (in
      multi-process jobs: a SIGTERM to any process, through JAX's preemption sync
      point, stops all at one step): run the same command again to resume (75 is
      EX_TEMPFAIL, "try again")
  130 a second SIGINT (Ctrl-C) while the first one's stop was under way: stopped at once,
      without a new checkpoint; the last complete one is intact
"""
import ast
import json
import logging as std_logging
import os
import sys

from absl import app
from absl import flags
from absl import logging
import ml_collections
from ml_collections import config_flags

from multistep_cm.sampling import inputs

EXIT_CONFIG, EXIT_DATA, EXIT_CHECKPOINT, EXIT_NONFINITE, EXIT_WORKDIR = 2, 3, 4, 5, 6
EXIT_IN_USE = 7
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


# Where the shipped configs are: configs/ beside the package, in a checkout of the repository.
CONFIGS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs")
_HELP_FLAGS = ("-h", "-?", "--help", "--helpshort", "--config_help")


def _variants(path: str) -> str:
  """A config file's variants, read without running it: its docstring's `Variants: ...`
  sentence, else the keys (and defaults) its `config_base.parse_arg` call takes."""
  with open(path, encoding="utf-8") as fh:
    tree = ast.parse(fh.read())
  doc = " ".join((ast.get_docstring(tree) or "").split())
  if "Variants:" in doc:
    text, depth = doc.split("Variants:", 1)[1].strip(), 0
    for i, char in enumerate(text):  # up to the sentence's end, outside parentheses
      depth += {"(": 1, ")": -1}.get(char, 0)
      if char == "." and depth == 0 and (i + 1 == len(text) or text[i + 1] == " "):
        return text[:i]
    return text
  calls = [node for node in ast.walk(tree) if isinstance(node, ast.Call)
           and getattr(node.func, "attr", None) == "parse_arg"]
  keys = [f"{k.arg}={ast.unparse(k.value)}" for c in calls for k in c.keywords if k.arg]
  return ", ".join(keys) if keys else "none"


def config_help(folder: str = CONFIGS) -> str:
  """What `--config` takes: each shipped config file with its variants, one line each, and
  how to choose a variant and override keys."""
  lines = ["--config=FILE[:key=value,...] picks a config file and its variants; "
           "--config.key=value (nested: --config.optimizer.learning_rate=3e-4; a staged run's "
           "stage: --config.stages.NAME.key=value) overrides any key after that; "
           "--config=<workdir>/config.json replays a run. A key or value the config does not "
           "allow is refused in one line, exit 2."]
  names = sorted(f for f in os.listdir(folder) if f.endswith(".py")) if os.path.isdir(
      folder) else []
  if not names:
    return "\n".join(lines + [f"(no shipped configs at {folder}: a checkout of the "
                              "repository has them in configs/)"])
  width = max(len(n) for n in names) + 2
  lines.append(f"Shipped configs ({os.path.relpath(folder)}/), with their variants:")
  lines += [f"  {name:<{width}}{_variants(os.path.join(folder, name))}" for name in names]
  return "\n".join(lines)


def _parse_flags(argv):
  """`--help` (or `--config_help`): this command's usage, its flags and `config_help()`,
  exit 0; else absl's parsing, where a bad flag, config file or override is one line and
  exit 2 (inputs.flags_parser)."""
  if any(a in _HELP_FLAGS for a in argv[1:]):
    print(__doc__.strip())
    print("\nFlags:\n" + flags.FLAGS.module_help(sys.modules[__name__]))
    print("\n" + config_help())
    sys.exit(0)
  return inputs.flags_parser(None, _CONFIG)(argv)


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
  del argv  # flags only (inputs.flags_parser)
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
  except checkpointing.WorkdirInUseError as e:
    _fail(EXIT_IN_USE, str(e))
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
