"""Orbax checkpoints of the train state, and loading parameters from another run.

A checkpoint at step k is a directory `<workdir>/checkpoints/<k>` with items:
  * `params`: the online parameters;
  * `ema`: `{"ema0": ..., "ema1": ...}`, one tree per EMA decay in `config.ema_decays`;
  * `opt_state`: the optimiser state;
  * `train`: step, rng and the non-finite-update counters;
  * `meta`: JSON: step, the input position (the next step; the data order is a
    function of (seed, step), data/pipeline.py), batch size, seed, EMA decays, model
    preset, loss mode, student steps.
Keeping them as separate items lets a student load a teacher's `ema` alone,
without its optimiser state. Restoring takes abstract arrays with shardings, so a
checkpoint restores onto any mesh (another device count included).

Saves are asynchronous (the train loop goes on while the bytes are written) and
atomic: orbax writes into a temporary directory and renames it when complete, so a
process killed mid-save leaves the previous checkpoint as the latest one.
"""
import dataclasses
import os
from typing import Any

from absl import logging
from etils import epath
from flax import traverse_util
import jax
import numpy as np
import orbax.checkpoint as ocp

ITEMS = ("params", "ema", "opt_state", "train", "meta")


class CheckpointError(RuntimeError):
  """A checkpoint that is missing or does not fit what the config asks for."""


def checkpoint_dir(workdir: str) -> str:
  return os.path.join(workdir, "checkpoints")


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
        enable_async_checkpointing=self.async_save and not ro, read_only=ro, create=not ro)
    handlers = {name: ocp.StandardCheckpointHandler() for name in ITEMS if name != "meta"}
    handlers["meta"] = ocp.JsonCheckpointHandler()
    self.manager = ocp.CheckpointManager(self.directory, options=options, item_handlers=handlers)

  def latest_step(self) -> int | None:
    return self.manager.latest_step()

  def all_steps(self):
    return self.manager.all_steps()

  def save(self, step: int, state, meta: dict[str, Any], force: bool = True) -> bool:
    """Starts an (async) save of `state` (a `TrainState`) at `step`."""
    args = ocp.args.Composite(
        params=ocp.args.StandardSave(state.params),
        ema=ocp.args.StandardSave(state.ema),
        opt_state=ocp.args.StandardSave(state.opt_state),
        train=ocp.args.StandardSave(state.counters()),
        meta=ocp.args.JsonSave(meta))
    return self.manager.save(step, args=args, force=force)

  def restore_state(self, step: int, abstract_state):
    """The full train state at `step`, placed by the shardings of `abstract_state`."""
    restored = self.manager.restore(step, args=ocp.args.Composite(
        params=ocp.args.StandardRestore(abstract_state.params),
        ema=ocp.args.StandardRestore(abstract_state.ema),
        opt_state=ocp.args.StandardRestore(abstract_state.opt_state),
        train=ocp.args.StandardRestore(abstract_state.counters()),
        meta=ocp.args.JsonRestore()))
    state = abstract_state.replace(params=restored["params"], ema=restored["ema"],
                                   opt_state=restored["opt_state"], **restored["train"])
    return state, restored["meta"]

  def restore_meta(self, step: int) -> dict[str, Any]:
    return self.manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"]

  def restore_params(self, step: int, abstract_params, which: str = "ema0"):
    """One parameter tree: `which` is "params" (raw) or an EMA name ("ema0", ...)."""
    if which == "params":
      restored = self.manager.restore(step, args=ocp.args.Composite(
          params=ocp.args.StandardRestore(abstract_params)))
      return restored["params"]
    restored = self.manager.restore(step, args=ocp.args.Composite(
        ema=ocp.args.StandardRestore({which: abstract_params})))
    return restored["ema"][which]

  def wait_until_finished(self):
    self.manager.wait_until_finished()

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
  raise CheckpointError(f"no complete checkpoint found at {path!r} (looked in "
                        f"{checkpoint_dir(path)!r} and {path!r})")


def saved_param_shapes(ckpt: "Checkpointer", step: int, which: str) -> dict[tuple, tuple]:
  """`{path: shape}` of one saved parameter tree, read from the checkpoint's metadata."""
  item = "params" if which == "params" else "ema"
  tree = ckpt.manager.item_metadata(step)[item]
  tree = getattr(tree, "tree", tree)  # orbax wraps the metadata tree
  if which != "params":
    if which not in tree:
      raise CheckpointError(f"checkpoint has no {which!r} weights (it has {sorted(tree)})")
    tree = tree[which]
  return {k: tuple(v.shape) for k, v in traverse_util.flatten_dict(tree).items()}


def load_params(path: str, abstract_params, which: str = "ema0", allow_missing: bool = False):
  """Parameters from another run's checkpoint (teacher, or a student's initialisation).

  Returns `(params, meta)`, or with `allow_missing` `(params, meta, missing)`: the
  arrays of `abstract_params` that the checkpoint lacks are left out of `params`
  and named in `missing` (an any-step student's new conditioning, initialised
  from a diffusion checkpoint). Arrays the model does not have, or of another
  shape, are an error either way.

  Raises CheckpointError when the checkpoint is missing or does not fit
  `abstract_params` (e.g. a different model preset), naming the arrays.
  """
  ckpt, step = resolve(path)
  meta = ckpt.restore_meta(step)
  want = traverse_util.flatten_dict(abstract_params)
  saved = saved_param_shapes(ckpt, step, which)
  extra = sorted("/".join(k) for k in saved if k not in want)
  wrong = sorted(f"{'/'.join(k)} {saved[k]} vs {tuple(v.shape)}" for k, v in want.items()
                 if k in saved and saved[k] != tuple(v.shape))
  missing = sorted("/".join(k) for k in want if k not in saved)
  if extra or wrong or (missing and not allow_missing):
    problems = [f"{name}: {', '.join(items[:4])}{' ...' if len(items) > 4 else ''}"
                for name, items in (("not in the model", extra), ("shape mismatch", wrong),
                                    ("missing from the checkpoint", missing)) if items]
    raise CheckpointError(
        f"checkpoint {path!r} (step {step}, model {meta.get('model')!r}) does not fit the "
        f"configured model ({config_model_hint(abstract_params)}): " + "; ".join(problems))
  target = traverse_util.unflatten_dict({k: v for k, v in want.items() if k in saved})
  params = ckpt.restore_params(step, target, which)
  logging.info("Loaded %s parameters of step %d from %s%s", which, step, path,
               f" (not in it, left as initialised: {missing})" if missing else "")
  return (params, meta, missing) if allow_missing else (params, meta)


def config_model_hint(abstract_params) -> str:
  count = sum(int(np.prod(v.shape)) for v in jax.tree.leaves(abstract_params))
  return f"{count / 1e6:.2f}M parameters"


def tree_shapes_match(a, b) -> bool:
  """True when two trees have the same structure and leaf shapes."""
  try:
    return all(x.shape == y.shape for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b),
                                                  strict=True)) and (
        jax.tree.structure(a) == jax.tree.structure(b))
  except ValueError:
    return False
