"""A trained run, read back from its workdir: the resolved config, the model and one weight set.

Every run's workdir holds `config.json` (written by the trainer) and
`checkpoints/`; the sampling and evaluation commands start from here.
"""
import dataclasses
import json
import os

import jax
import ml_collections
from etils import epath

from multistep_cm import checkpointing
from multistep_cm import models
from multistep_cm.diffusion import schedules
from multistep_cm.models import partitioning


@dataclasses.dataclass
class Run:
  """A run's config, model, schedule and the parameters of one checkpoint."""
  workdir: str
  config: ml_collections.ConfigDict
  model: object
  schedule: schedules.Schedule
  params: object
  step: int
  weights: str  # 'params' (raw) or an EMA name ('ema0', ...)
  meta: dict = dataclasses.field(default_factory=dict)  # the checkpoint's metadata

  @property
  def mode(self) -> str:
    return self.config.loss.mode

  @property
  def student_steps(self) -> int | None:
    """S for a Multistep CM run (the largest for an any-step run), None for diffusion."""
    return None if self.mode == "diffusion" else int(self.config.loss.student_steps)

  @property
  def step_counts(self) -> tuple[int, ...]:
    """The step counts the student can sample with: its S, or an any-step run's set."""
    if self.mode == "diffusion":
      return ()
    return tuple(int(s) for s in self.config.loss.get("anystep_counts", ())) or (
        self.student_steps,)

  def boundaries(self, student_steps: int) -> tuple[float, ...]:
    """The segment boundaries S was trained with, as stored in the checkpoint."""
    stored = (self.meta.get("segment_boundaries") or {}).get(str(student_steps))
    if stored is None:  # checkpoints written before boundaries were stored: equal segments
      return tuple(float(k) / student_steps for k in range(student_steps + 1))
    return tuple(stored)

  @property
  def name(self) -> str:
    return os.path.basename(os.path.normpath(self.workdir))

  def describe_weights(self) -> str:
    if self.weights == "params":
      return f"raw parameters, step {self.step}"
    index = int(self.weights[3:]) if self.weights.startswith("ema") else 0
    decays = list(self.config.ema_decays)
    decay = decays[index] if index < len(decays) else "?"
    return f"EMA (decay {decay}), step {self.step}"


def is_run_dir(path: str) -> bool:
  return (epath.Path(path) / "config.json").exists()


def find_runs(path: str) -> list[str]:
  """`path` itself if it is a run, else its immediate sub-directories that are (a staged root)."""
  if is_run_dir(path):
    return [path]
  root = epath.Path(path)
  if not root.is_dir():
    raise checkpointing.CheckpointError(f"{path!r} is not a directory")
  found = sorted(str(p) for p in root.iterdir() if p.is_dir() and is_run_dir(str(p)))
  if not found:
    raise checkpointing.CheckpointError(
        f"{path!r} holds no run (a directory with config.json and checkpoints/, written by "
        f"python -m multistep_cm.main)")
  return found


def load_config(workdir: str) -> ml_collections.ConfigDict:
  path = epath.Path(workdir) / "config.json"
  if not path.exists():
    raise checkpointing.CheckpointError(f"{workdir!r} is not a run directory (no config.json)")
  return ml_collections.ConfigDict(json.loads(path.read_text()))


def load_run(workdir: str, weights: str = "ema0", step: int | None = None, mesh=None) -> Run:
  """Loads the config and one set of weights (replicated over `mesh`, default all devices)."""
  config = load_config(workdir)
  model = models.get_model_for_config(config)
  schedule = schedules.get_schedule(config.schedule.name, **config.schedule.kwargs.to_dict())
  if mesh is None:
    mesh = jax.sharding.Mesh(jax.devices(), ("data",))
  replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
  boxed = models.abstract_variables(model)["params"]
  abstract = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=replicated),
                          partitioning.unbox(boxed))
  path = workdir if step is None else os.path.join(checkpointing.checkpoint_dir(workdir),
                                                   str(step))
  ckpt, found_step = checkpointing.resolve(path)
  params, meta = checkpointing.load_params(path, abstract, weights)
  ckpt.close()
  return Run(workdir=workdir, config=config, model=model, schedule=schedule, params=params,
             step=found_step, weights=weights, meta=meta)
