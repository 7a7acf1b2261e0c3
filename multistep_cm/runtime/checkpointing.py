"""Orbax checkpoints of the train state, and loading parameters from another run.

A checkpoint at step k is a directory `<workdir>/checkpoints/<k>` with items:
  * `params`: the online parameters;
  * `ema`: `{"ema0": ..., "ema1": ...}`, one tree per EMA decay in `config.ema_decays`;
  * `opt_state`: the optimiser state;
  * `train`: step, rng and the non-finite-update counters;
  * `meta`: JSON: step, the input position (the next step; the data order is a
    function of (seed, step), data/pipeline.py), batch size, seed, EMA decays, model
    preset, loss mode, student steps, and a checksum of every array (`checksums`).
Keeping them as separate items lets a student load a teacher's `ema` alone,
without its optimiser state. Restoring takes abstract arrays with shardings, so a
checkpoint restores onto any mesh (another device count included).

Saves are asynchronous (the train loop goes on while the bytes are written) and
atomic: orbax writes into `<k>.orbax-checkpoint-tmp` and renames it to `<k>` when
complete (on GCS: a commit marker file), so a process killed mid-save leaves the
previous checkpoint as the latest one. Readers never list temporary directories;
the next writer deletes them when it opens the directory, so no manual cleanup is
needed after a crash.

Neither orbax nor tensorstore checks that the bytes read back are the bytes written
(zarr3's crc32c covers the shard index only), so every save records two 32-bit sums
of each array's words, position-weighted so that any change of one word changes the
first (`tree_checksums`, computed on the devices, sharded arrays included), and every
restore recomputes them: a checkpoint whose bytes changed, or that cannot be read at
all (a truncated file), raises `CorruptCheckpointError` naming the step and the array.
The trainer then falls back to the newest checkpoint that verifies (training/loop.py).
Checkpoints written before checksums existed restore unverified.

Errors are this project's: a checkpoint that is missing or does not fit the model
raises `CheckpointError` (naming the path and the first mismatching arrays); a
write that fails because the disk is full or read-only raises `OSError` with the
errno (ENOSPC, EROFS, ...), also when the write failed in orbax's background thread.
"""
import contextlib
import dataclasses
import errno
import fcntl
import logging as std_logging
import os
import re
import socket
import tempfile
from typing import Any

from absl import logging
from etils import epath
from flax import traverse_util
import jax
import jax.numpy as jnp
import orbax.checkpoint as ocp

ITEMS = ("params", "ema", "opt_state", "train", "meta")


class QuietOrbax(std_logging.Filter):
  """Drops orbax's records below WARNING (each save and restore logs dozens: 57 of the
  62 lines of one `sample` call) and its "Given directory is read only" warning, which
  every reader gets (`Checkpointer(read_only=True)` is read-only on purpose)."""

  def filter(self, record):
    if f"{os.sep}orbax{os.sep}" not in record.pathname:
      return True
    if record.levelno < std_logging.WARNING:
      return False
    return not str(record.msg).startswith("Given directory is read only")


def quiet_orbax_logs():
  """Installs `QuietOrbax` on absl's log handler, unless the command line set
  `--verbosity` (or `-v`): then orbax logs as it does by itself."""
  from absl import flags  # pylint: disable=g-import-not-at-top
  if flags.FLAGS.is_parsed() and flags.FLAGS["verbosity"].present:
    return
  logging.get_absl_handler().addFilter(QuietOrbax())


class CheckpointError(RuntimeError):
  """A checkpoint that is missing or does not fit what the config asks for."""


class CorruptCheckpointError(CheckpointError):
  """A checkpoint whose bytes cannot be read back (`unreadable`), or are not the bytes
  written (an array does not match its checksum)."""

  def __init__(self, message: str, unreadable: bool = False):
    super().__init__(message)
    self.unreadable = unreadable


# --- checksums ---------------------------------------------------------------------------------


def _words(x: jax.Array) -> jax.Array:
  """The array's bits as a flat uint32 vector (narrower types widened, wider ones split)."""
  itemsize = x.dtype.itemsize
  if itemsize in (4, 8):  # 8-byte types become [..., 2] words, flattened
    return jax.lax.bitcast_convert_type(x, jnp.uint32).ravel()
  if itemsize == 2:
    return jax.lax.bitcast_convert_type(x, jnp.uint16).astype(jnp.uint32).ravel()
  return x.astype(jnp.uint32).ravel()  # bool, int8, uint8


@jax.jit
def _sums(leaves):
  """Per leaf: `sum((2i + 1) w_i)` and `sum((w_i ^ (i * 0x9E3779B9)) * 0x85EBCA6B)` mod 2^32.

  A change of one word by any nonzero amount d changes the first sum by (2i + 1) d, which
  is nonzero mod 2^32 because 2i + 1 is odd; the second catches most other changes.
  """
  out = []
  for x in leaves:
    w = _words(x)
    i = jnp.arange(w.shape[0], dtype=jnp.uint32)
    out.append(jnp.stack([jnp.sum(w * (2 * i + 1), dtype=jnp.uint32),
                          jnp.sum((w ^ (i * jnp.uint32(0x9E3779B9))) * jnp.uint32(0x85EBCA6B),
                                  dtype=jnp.uint32)]))
  return out


def tree_checksums(tree, prefix: str = "") -> dict[str, str]:
  """`{path: 16 hex digits}` for every array of `tree` (paths as `jax.tree_util.keystr`)."""
  flat = jax.tree_util.tree_flatten_with_path(tree)[0]
  sums = jax.device_get(_sums([jnp.asarray(leaf) for _, leaf in flat]))
  return {prefix + jax.tree_util.keystr(path): f"{int(a):08x}{int(b):08x}"
          for (path, _), (a, b) in zip(flat, sums)}


def verify(tree, stored: dict[str, str] | None, prefix: str, where: str):
  """Raises CorruptCheckpointError unless every array of `tree` matches its stored checksum
  (`stored` of a checkpoint written before checksums: nothing to check)."""
  if not stored:
    return
  for path, value in tree_checksums(tree, prefix).items():
    if stored.get(path) != value:
      raise CorruptCheckpointError(
          f"checkpoint {where} is corrupt: array {path} does not match its checksum "
          f"(stored {stored.get(path)}, read {value})")


# Write failures that mean "this filesystem cannot take the checkpoint" (the
# workdir's fault, not the checkpoint's): permission, full disk or quota, read-only.
WORKDIR_ERRNOS = (errno.EACCES, errno.EPERM, errno.ENOSPC, errno.EDQUOT, errno.EROFS,
                   errno.EFBIG)


def _as_workdir_error(error: BaseException, directory: str) -> OSError | None:
  """The OSError behind a failed save, or None if the failure is something else.

  Orbax reports background write failures as the OSError itself, or as tensorstore's
  ValueError whose text carries `[os_error_code='28']`; both are looked for along
  the exception's causes.
  """
  seen = error
  while seen is not None:
    if isinstance(seen, OSError) and seen.errno in WORKDIR_ERRNOS:
      return OSError(seen.errno, seen.strerror or os.strerror(seen.errno), directory)
    match = re.search(r"os_error_code='?(\d+)", str(seen))
    if match and int(match.group(1)) in WORKDIR_ERRNOS:
      code = int(match.group(1))
      return OSError(code, os.strerror(code), directory)
    seen = seen.__cause__ or seen.__context__
  return None


def probe_writable(directory: str):
  """Raises OSError (EROFS, EACCES, ...) unless a file can be created in the local
  `directory`: a run or an output fails here, before anything is computed."""
  fd, path = tempfile.mkstemp(prefix=".write_test.", dir=directory)
  os.close(fd)
  os.remove(path)


LOCK_FILE = ".lock"


class WorkdirInUseError(RuntimeError):
  """Another process is training in this workdir (it holds `<workdir>/.lock`)."""


@contextlib.contextmanager
def workdir_lock(workdir: str):
  """Holds an exclusive lock on the local `workdir` while a run trains in it.

  Two trainers in one workdir would interleave their checkpoints and logs; the second one
  raises `WorkdirInUseError` here instead, naming the process that holds the lock. The lock
  is `flock` on `<workdir>/.lock`, which the kernel releases when its holder exits however it
  exits (a SIGKILL or a crash included), so a stale lock cannot block a resume; the file
  itself stays, holding the last holder's pid and host. GCS workdirs (`://`) and processes
  other than 0 of a multi-process job take no lock; a filesystem without `flock` (some NFS
  mounts) gets a warning and no lock.
  """
  if "://" in workdir or jax.process_index() != 0:
    yield
    return
  handle = open(os.path.join(workdir, LOCK_FILE), "a+", encoding="utf-8")
  try:
    locked = True
    try:
      fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
      handle.seek(0)
      holder = handle.read().strip() or "a process"
      raise WorkdirInUseError(
          f"the workdir {workdir!r} is in use: {holder} is training in it (it holds "
          f"{os.path.join(workdir, LOCK_FILE)}). Wait for that run or stop it, then run the "
          "same command to resume; or give this run another --workdir") from None
    except OSError as e:  # ENOLCK, EOPNOTSUPP: a filesystem without locks
      logging.warning("workdir %s: no lock (%s); make sure no other run trains in it",
                      workdir, e.strerror)
      locked = False
    if locked:
      handle.seek(0)
      handle.truncate()
      handle.write(f"pid {os.getpid()} on {socket.gethostname()}\n")
      handle.flush()
    yield
  finally:
    handle.close()


def checkpoint_dir(workdir: str) -> str:
  return os.path.join(workdir, "checkpoints")


def is_run_dir(path: str) -> bool:
  """Whether `path` is a run's workdir (it has a `checkpoints` directory), local or GCS."""
  return bool(path) and epath.Path(checkpoint_dir(str(path).rstrip("/"))).is_dir()


@dataclasses.dataclass
class Checkpointer:
  """Thin wrapper over `ocp.CheckpointManager` with this project's item layout."""
  directory: str
  max_to_keep: int = 3
  keep_period: int | None = None
  async_save: bool = True
  read_only: bool = False

  def __post_init__(self):
    ro = self.read_only  # a reader keeps and saves nothing (and says so to orbax)
    options = ocp.CheckpointManagerOptions(
        max_to_keep=None if ro else self.max_to_keep, keep_period=self.keep_period,
        save_interval_steps=0 if ro else 1,
        enable_async_checkpointing=self.async_save and not ro, read_only=ro, create=not ro,
        # Temporary directories of saves cut short by a kill or a full disk.
        cleanup_tmp_directories=not ro)
    handlers = {name: ocp.StandardCheckpointHandler() for name in ITEMS if name != "meta"}
    handlers["meta"] = ocp.JsonCheckpointHandler()
    self.manager = ocp.CheckpointManager(self.directory, options=options, item_handlers=handlers)

  def latest_step(self) -> int | None:
    return self.manager.latest_step()

  def all_steps(self):
    return self.manager.all_steps()

  def save(self, step: int, state, meta: dict[str, Any], force: bool = True) -> bool:
    """Starts an (async) save of `state` (a `TrainState`) at `step`.

    Raises:
      OSError: this or the previous (background) save could not be written.
    """
    items = {"params": state.params, "ema": state.ema, "opt_state": state.opt_state,
             "train": state.counters()}
    checksums = {}
    for name, tree in items.items():
      checksums.update(tree_checksums(tree, name))
    args = ocp.args.Composite(
        **{name: ocp.args.StandardSave(tree) for name, tree in items.items()},
        meta=ocp.args.JsonSave({**meta, "checksums": checksums}))
    try:
      return self.manager.save(step, args=args, force=force)
    except Exception as e:  # pylint: disable=broad-except
      raise _as_workdir_error(e, self.directory) or e

  def restore_state(self, step: int, abstract_state):
    """The full train state at `step`, placed by the shardings of `abstract_state`.

    Raises:
      CheckpointError: the checkpoint's parameters do not fit `abstract_state`.
      CorruptCheckpointError: its bytes cannot be read, or do not match their checksums.
    """
    self.check_fits(step, "params", abstract_state.params)
    items = {"params": abstract_state.params, "ema": abstract_state.ema,
             "opt_state": abstract_state.opt_state, "train": abstract_state.counters()}
    with self._reading(step):
      restored = self.manager.restore(step, args=ocp.args.Composite(
          **{name: ocp.args.StandardRestore(tree) for name, tree in items.items()},
          meta=ocp.args.JsonRestore()))
    for name in items:
      verify(restored[name], restored["meta"].get("checksums"), name,
             f"{self.directory}/{step}")
    state = abstract_state.replace(params=restored["params"], ema=restored["ema"],
                                   opt_state=restored["opt_state"], **restored["train"])
    return state, restored["meta"]

  @contextlib.contextmanager
  def _reading(self, step: int):
    """Failures to read the arrays (a truncated or garbled file; orbax raises anything from
    ValueError to a bare Exception) as CorruptCheckpointError(unreadable=True). Whether the
    config or the bytes are at fault is for the caller to decide: the structure was
    checked beforehand from the metadata, and an older checkpoint that reads shows it."""
    try:
      yield
    except Exception as e:  # pylint: disable=broad-except
      raise CorruptCheckpointError(
          f"checkpoint {self.directory}/{step} could not be read "
          f"({type(e).__name__}: {str(e).splitlines()[0][:300]})", unreadable=True) from None

  def restore_meta(self, step: int) -> dict[str, Any]:
    return self.manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"]

  def restore_params(self, step: int, abstract_params, which: str = "ema0"):
    """One parameter tree, verified: `which` is "params" (raw) or an EMA name ("ema0", ...).

    Raises:
      CorruptCheckpointError: its bytes cannot be read, or do not match their checksums.
    """
    item, prefix = _item_and_prefix(which)
    target = abstract_params if item == "params" else {which: abstract_params}
    with self._reading(step):
      restored = self.manager.restore(step, args=ocp.args.Composite(
          **{item: ocp.args.StandardRestore(target)}, meta=ocp.args.JsonRestore()))
    verify(restored[item], restored["meta"].get("checksums"), item, f"{self.directory}/{step}")
    return restored[item] if item == "params" else restored[item][which]

  def quarantine(self, step: int) -> str:
    """Moves the checkpoint of `step` out of the checkpoint directory, to
    `<directory>_corrupt/<step>` (process 0; every process waits), so training can go on
    past it; returns where it went."""
    target = f"{self.directory}_corrupt/{step}"
    if jax.process_index() == 0:
      epath.Path(target).parent.mkdir(parents=True, exist_ok=True)
      if epath.Path(target).exists():
        target = f"{target}.{len(list(epath.Path(target).parent.iterdir()))}"
      epath.Path(self.directory, str(step)).rename(target)
    if jax.process_count() > 1:
      from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
      multihost_utils.sync_global_devices(f"quarantine checkpoint {step}")
    self.manager.reload()
    return target

  def stored_tree(self, step: int, item: str, prefix: str = ""):
    """The metadata tree (shapes, dtypes) of item `item` at `step`, under key `prefix`."""
    stored = self.manager.item_metadata(step).get(item)
    stored = getattr(stored, "tree", stored)  # orbax wraps the metadata tree
    if stored is None:
      raise CheckpointError(f"checkpoint {self.directory}/{step} has no {item!r} item")
    if prefix:
      if not isinstance(stored, dict) or prefix not in stored:
        found = sorted(stored) if isinstance(stored, dict) else []
        raise CheckpointError(f"checkpoint {self.directory}/{step} has no {item} tree "
                              f"{prefix!r} (it has {found})")
      stored = stored[prefix]
    return stored

  def check_fits(self, step: int, item: str, abstract, prefix: str = ""):
    """Raises CheckpointError unless item `item` at `step` has the structure and shapes of
    `abstract` (under key `prefix` of the item, e.g. "ema0"), reading metadata only."""
    problems = tree_mismatches(self.stored_tree(step, item, prefix), abstract)
    if problems:
      meta = self.restore_meta(step) or {}
      raise CheckpointError(
          f"checkpoint {self.directory}/{step} (model {meta.get('model')!r}) does not fit the "
          f"configured model: {'; '.join(problems[:3])}"
          f"{f' (and {len(problems) - 3} more)' if len(problems) > 3 else ''}")

  def wait_until_finished(self):
    """Blocks until the last save is on disk; raises OSError if it could not be written."""
    try:
      self.manager.wait_until_finished()
    except Exception as e:  # pylint: disable=broad-except
      raise _as_workdir_error(e, self.directory) or e

  def reached_preemption(self, step: int) -> bool:
    """True on every process once JAX's preemption notifier has fired (multi-host jobs)."""
    return self.manager.reached_preemption(step)

  def close(self):
    self.manager.close()


def resolve(path: str) -> tuple[Checkpointer, int]:
  """A workdir, its `checkpoints` dir, or one step's dir -> (read-only Checkpointer, step).

  Works for local and GCS paths. Raises CheckpointError naming the path when there
  is no complete checkpoint there.
  """
  path = str(path).rstrip("/")
  candidates = [(checkpoint_dir(path), None), (path, None)]
  base = os.path.basename(path)
  if base.isdigit():
    candidates.insert(0, (os.path.dirname(path), int(base)))
  for directory, step in candidates:
    if not epath.Path(directory).is_dir():
      continue
    ckpt = Checkpointer(directory, read_only=True, async_save=False)
    steps = ckpt.all_steps()
    if steps and (step is None or step in steps):
      return ckpt, max(steps) if step is None else step
    ckpt.close()
  raise CheckpointError(f"no complete checkpoint found at {path!r} (looked in "
                        f"{checkpoint_dir(path)!r} and {path!r})")


def check_params(path: str, abstract_params, which: str = "ema0", key: str = "") -> int:
  """Raises CheckpointError unless `path` holds a complete checkpoint whose `which`
  parameters fit `abstract_params`; reads metadata only. Returns its step.

  `key` (e.g. "config.teacher_checkpoint") starts the error message.
  """
  with _errors_named(key, path):
    ckpt, step = resolve(path)
    try:
      _check_which(ckpt, step, abstract_params, which)
    finally:
      ckpt.close()
  return step


def _item_and_prefix(which: str) -> tuple[str, str]:
  return ("params", "") if which == "params" else ("ema", which)


def _check_which(ckpt: Checkpointer, step: int, abstract_params, which: str):
  item, prefix = _item_and_prefix(which)
  ckpt.check_fits(step, item, abstract_params, prefix=prefix)


@contextlib.contextmanager
def _errors_named(key: str, path: str):
  """CheckpointErrors raised inside start with `key` and end with the path asked for."""
  try:
    yield
  except CheckpointError as e:
    message = str(e) if repr(path) in str(e) else f"{e} (from {path!r})"
    raise CheckpointError(f"{key}: {message}" if key else message) from None


def load_params(path: str, abstract_params, which: str = "ema0", key: str = "",
                allow_missing: bool = False):
  """Parameters from another run's checkpoint (teacher, or a student's initialisation).

  Returns `(params, meta)`, or with `allow_missing` `(params, meta, missing)`: the
  arrays of `abstract_params` that the checkpoint lacks are left out of `params` and
  named in `missing` (an any-step student's new conditioning, initialised from a
  diffusion checkpoint). Arrays the model does not have, or of another shape, are an
  error either way.

  Raises CheckpointError when the checkpoint is missing or its parameter shapes do
  not match `abstract_params` (e.g. a different model preset); `key` (e.g.
  "config.init_from") starts the message.
  """
  missing = []
  with _errors_named(key, path):
    ckpt, step = resolve(path)
    meta = {}
    try:
      meta = ckpt.restore_meta(step) or {}
      target = abstract_params
      if allow_missing:
        stored = traverse_util.flatten_dict(ckpt.stored_tree(step, *_item_and_prefix(which)))
        wanted = traverse_util.flatten_dict(abstract_params)
        missing = sorted("/".join(k) for k in wanted if k not in stored)
        target = traverse_util.unflatten_dict({k: v for k, v in wanted.items() if k in stored})
      _check_which(ckpt, step, target, which)
      params = ckpt.restore_params(step, target, which)
    except (ValueError, KeyError, TypeError) as e:
      raise CheckpointError(
          f"checkpoint {path!r} (step {step}, model {meta.get('model')!r}) does not fit the "
          f"configured model: {str(e).splitlines()[0][:300]}") from None
    finally:
      ckpt.close()
  logging.info("Loaded %s parameters of step %d from %s%s", which, step, path,
               f" (not in it, left as initialised: {missing})" if missing else "")
  return (params, meta, missing) if allow_missing else (params, meta)


def tree_mismatches(stored, abstract) -> list[str]:
  """Where two trees of arrays (or array metadata) differ: missing keys, then shapes.

  Returns one short line per difference, e.g. "block0/dense0/kernel: checkpoint
  (32, 64), model (64, 128)"; empty when structures and shapes agree.
  """
  def by_path(tree):
    leaves = jax.tree_util.tree_flatten_with_path(tree)[0]
    return {"/".join(str(getattr(k, "key", getattr(k, "idx", k))) for k in path): leaf
            for path, leaf in leaves}
  have, want = by_path(stored), by_path(abstract)
  problems = [f"{k}: missing from the checkpoint" for k in want if k not in have]
  problems += [f"{k}: in the checkpoint, not in the model" for k in have if k not in want]
  problems += [f"{k}: checkpoint {tuple(have[k].shape)}, model {tuple(want[k].shape)}"
               for k in want if k in have and tuple(have[k].shape) != tuple(want[k].shape)]
  return problems

