"""A trained run, read back from its workdir: its plan, the model and one weight set.

Every run's workdir holds `config.json` (written by the trainer) and
`checkpoints/`; the sampling and evaluation commands start from here. A `Run` holds the
plan resolved from both (config/plan.py: `RunPlan.from_run`), so it says how it samples
(`sampler_spec`: a student's own step counts and the segment boundaries stored in its
checkpoint) and reads its own training examples (for aDDIM's x_var table).
"""
import dataclasses
import json
import os

import jax
import jax.numpy as jnp
import ml_collections
from etils import epath
import numpy as np

from multistep_cm.config import base as config_base
from multistep_cm.config import build as config_build
from multistep_cm.config import plan as plan_lib
from multistep_cm.diffusion import schedules
from multistep_cm import models
from multistep_cm.models import conditioning
from multistep_cm.models import partitioning
from multistep_cm.runtime import checkpointing
from multistep_cm.runtime import sharding
from multistep_cm.sampling import generation
from multistep_cm.sampling import inputs


@dataclasses.dataclass
class Run:
  """A run's plan (config/plan.py), its model and schedule, and one checkpoint's weights."""
  workdir: str
  plan: plan_lib.RunPlan
  params: object
  step: int
  weights: str  # 'params' (raw) or an EMA name ('ema0', ...)
  meta: dict = dataclasses.field(default_factory=dict)  # the checkpoint's metadata

  @property
  def config(self) -> ml_collections.FrozenConfigDict:
    """The run's hyperparameters, every default filled."""
    return self.plan.config

  @property
  def model(self):
    return self.plan.model

  @property
  def schedule(self) -> schedules.Schedule:
    return self.plan.schedule

  @property
  def mode(self) -> str:
    return self.plan.objective.value

  @property
  def student_steps(self) -> int | None:
    """S for a Multistep CM run (the largest for an any-step run), None for diffusion."""
    return self.plan.student_steps

  @property
  def step_counts(self) -> tuple[int, ...]:
    """The step counts the student can sample with: its S, or an any-step run's set."""
    return self.plan.step_counts

  def boundaries(self, student_steps: int) -> tuple[float, ...]:
    """The segment boundaries S was trained with, as stored in the checkpoint."""
    return self.plan.boundaries[student_steps]

  @property
  def guidance_range(self) -> tuple[float, float] | None:
    """`(w_min, w_max)` a guidance-conditioned student was trained on; None for a student
    trained at one w, or diffusion."""
    return self.plan.guidance_range

  def sampler_spec(self, steps: int = 0, sampler: str | None = None, x_var: str = "analytic",
                   guidance: float | None = None, spacing: str = "uniform",
                   final_step: str | None = None,
                   flag=lambda arg: f"--{arg}") -> generation.SamplerSpec:
    """The sampler for this run and a command line's choices: `RunPlan.sampler` (`flag`: how
    its errors name an argument).

    Raises:
      ValueError: the choices do not fit the run (RunPlan.sampler).
    """
    return self.plan.sampler(steps, guidance, sampler=sampler, x_var=x_var, spacing=spacing,
                             final_step=final_step, name=self.workdir, flag=flag)

  def training_examples(self, num_examples: int, seed: int):
    """`(data, conditioning or None)`: up to `num_examples` distinct training examples, drawn
    with `seed` (for aDDIM's x_var table); the conditioning is conditioning.from_batch's."""
    source = self.plan.make_source()
    rng = np.random.default_rng(seed)
    idx = np.sort(rng.choice(len(source), min(num_examples, len(source)), replace=False))
    batch = source.get(idx)
    return batch[self.plan.data_key], conditioning.from_batch(self.model, batch)

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


# The input checks `sample` and `evaluate` share with the other commands (inputs.py).
InputError = inputs.InputError
check_writable = inputs.check_writable
positive = inputs.positive


def checkpoint_steps(workdir: str) -> list[int]:
  """The steps of the run's complete checkpoints, oldest first (none: [])."""
  directory = epath.Path(checkpointing.checkpoint_dir(workdir))
  if not directory.is_dir():
    return []
  return sorted(int(p.name) for p in directory.iterdir() if p.name.isdigit() and p.is_dir())


def earlier_checkpoints(workdir: str, step: int | None) -> str:
  """The hint for a checkpoint of `workdir` that cannot be used (`step`; None: the latest):
  its complete checkpoints before that one, if any, to pick with --checkpoint_step."""
  steps = checkpoint_steps(workdir)
  if step is None:
    step = steps[-1] if steps else 0
  earlier = [s for s in steps if s < step]
  return (f"; earlier checkpoints: steps {earlier} (pick one with --checkpoint_step)"
          if earlier else "")


def nonfinite_arrays(params) -> list[str]:
  """The paths of the floating-point arrays of `params` holding a NaN or an inf (a damaged
  or diverged checkpoint, refused before anything is sampled from it)."""
  leaves = jax.tree_util.tree_flatten_with_path(params)[0]
  floats = [(p, x) for p, x in leaves if jnp.issubdtype(x.dtype, jnp.inexact)]
  ok = jax.device_get([jnp.all(jnp.isfinite(x)) for _, x in floats])
  return [jax.tree_util.keystr(p) for (p, _), fine in zip(floats, ok) if not fine]


def weight_names(config) -> list[str]:
  """What `--weights` may name for a run of `config`: 'params' and one EMA per decay."""
  decays = config_base.with_defaults(config).ema_decays
  return ["params"] + [f"ema{i}" for i in range(len(decays))]


def check_run(workdir: str, weights: str, step: int | None = None, root_ok: bool = False,
              flag=lambda arg: f"--{arg}"):
  """Raises InputError unless `workdir` is a run (or, with `root_ok`, a directory of runs)
  whose checkpoints hold `weights` (every run's) and, if given, the checkpoint of `step`;
  reads only directory listings and `config.json`. The messages name the arguments as
  `flag(name)` does: a command's `--workdir` by default, a library call's `workdir`."""
  arg = lambda name, value: f"{flag(name)}={value}"
  if not epath.Path(workdir).exists():
    raise InputError(f"{arg('workdir', workdir)} does not exist")
  if not epath.Path(workdir).is_dir():
    raise InputError(f"{arg('workdir', workdir)} is not a directory")
  if is_run_dir(workdir):
    run_dirs = [workdir]
  else:
    stages = sorted(p.name for p in epath.Path(workdir).iterdir()
                    if p.is_dir() and is_run_dir(str(p)))
    if not stages:
      raise InputError(f"{arg('workdir', workdir)} holds no run (a directory with config.json and "
                       "checkpoints/, written by python -m multistep_cm.main)")
    if not root_ok:
      example = arg("workdir", os.path.join(workdir, stages[-1]))
      raise InputError(f"{arg('workdir', workdir)} is a staged run's root: name one of its "
                       f"stages {stages} (e.g. {example})")
    run_dirs = [os.path.join(workdir, name) for name in stages]
  for run_dir in run_dirs:
    steps = checkpoint_steps(run_dir)
    if not steps:
      raise InputError(f"{arg('workdir', run_dir)} has no complete checkpoint yet", code=4)
    if step is not None and step not in steps:
      raise InputError(f"{arg('checkpoint_step', step)}: {run_dir} has checkpoints of steps "
                       f"{steps}")
    try:
      names = weight_names(load_config(run_dir))
    except (checkpointing.CheckpointError, ValueError) as e:
      raise InputError(f"{arg('workdir', run_dir)}: its config.json cannot be read ({e})",
                       code=4) from None
    if weights not in names:
      raise InputError(f"{arg('weights', weights)}: {run_dir} has {names}")


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
  """The run's `config.json`, a stage's `stage:<name>` references (a staged root records
  its stages relative to each other, training/loop.py) resolved to `<name>` beside it."""
  path = epath.Path(workdir) / "config.json"
  if not path.exists():
    raise checkpointing.CheckpointError(f"{workdir!r} is not a run directory (no config.json)")
  config = ml_collections.ConfigDict(json.loads(path.read_text()))
  root = os.path.dirname(str(workdir).rstrip("/"))
  for key in ("teacher_checkpoint", "init_from"):
    value = config.get(key)
    if isinstance(value, str) and value.startswith("stage:"):
      config[key] = os.path.join(root, value[len("stage:"):])
  return config


def load_plan(workdir: str, step: int | None = None) -> plan_lib.RunPlan:
  """The run's plan from `config.json` and one checkpoint's metadata (default the latest),
  no weights read."""
  config = load_config(workdir)
  path = workdir if step is None else os.path.join(checkpointing.checkpoint_dir(workdir),
                                                   str(step))
  ckpt, found_step = checkpointing.resolve(path)
  try:
    meta = ckpt.restore_meta(found_step) or {}
  finally:
    ckpt.close()
  return plan_lib.RunPlan.from_run(config, meta)


def load_run(workdir: str, weights: str = "ema0", step: int | None = None, mesh=None) -> Run:
  """Loads the run's plan (`config.json` and the checkpoint's metadata) and one set of
  weights (replicated over `mesh`, default all devices)."""
  config = load_config(workdir)
  model = config_build.get_model(config_base.with_defaults(config))
  replicated = sharding.replicated(sharding.data_mesh() if mesh is None else mesh)
  boxed = models.abstract_variables(model)["params"]
  abstract = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=replicated),
                          partitioning.unbox(boxed))
  path = workdir if step is None else os.path.join(checkpointing.checkpoint_dir(workdir),
                                                   str(step))
  ckpt, found_step = checkpointing.resolve(path)
  params, meta = checkpointing.load_params(path, abstract, weights)
  ckpt.close()
  return Run(workdir=workdir, plan=plan_lib.RunPlan.from_run(config, meta), params=params,
             step=found_step, weights=weights, meta=meta)
