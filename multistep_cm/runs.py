"""A trained run, read back from its workdir: the resolved config, the model and one weight set.

Every run's workdir holds `config.json` (written by the trainer) and
`checkpoints/`; the sampling and evaluation commands start from here. A `Run` also
says how it samples (`sampler_spec`: a student's own step counts and the segment
boundaries stored in its checkpoint) and reads its own training examples (for aDDIM's
x_var table).
"""
import dataclasses
import json
import os

import jax
import ml_collections
from etils import epath
import numpy as np

from multistep_cm import checkpointing
from multistep_cm import conditioning
from multistep_cm import config_build
from multistep_cm import generation
from multistep_cm import models
from multistep_cm import sharding
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
    return int(self.config.loss.student_steps) if config_build.is_student(self.config) else None

  @property
  def step_counts(self) -> tuple[int, ...]:
    """The step counts the student can sample with: its S, or an any-step run's set."""
    return config_build.step_counts(self.config)

  def boundaries(self, student_steps: int) -> tuple[float, ...]:
    """The segment boundaries S was trained with, as stored in the checkpoint."""
    stored = (self.meta.get("segment_boundaries") or {}).get(str(student_steps))
    if stored is None:  # checkpoints written before boundaries were stored: equal segments
      return tuple(float(k) / student_steps for k in range(student_steps + 1))
    return tuple(stored)

  @property
  def guidance_range(self) -> tuple[float, float] | None:
    """`(w_min, w_max)` a guidance-conditioned student was trained on, as stored in its
    checkpoint (else its config's); None for a student trained at one w, or diffusion."""
    stored = self.meta.get("guidance_range")
    if stored:
      return (float(stored[0]), float(stored[1]))
    return config_build.guidance_range(self.config) if config_build.is_student(
        self.config) else None

  def sampler_spec(self, steps: int = 0, sampler: str | None = None, x_var: str = "analytic",
                   guidance: float | None = None, spacing: str = "uniform",
                   final_step: str | None = None) -> generation.SamplerSpec:
    """The sampler for this run and a command line's choices (0 / None: the run's own).

    A student trained on a range of guidance scales is told `guidance` (None: the
    range's lower end w_min, the checkpoint's default).

    Raises:
      ValueError: the choices do not fit the run (a step count the student was not
        trained for, a diffusion sampler for a student, a guidance scale outside the
        range it was trained on).
    """
    w_range = self.guidance_range
    if w_range is None:
      guidance = guidance or 0.0
    elif guidance is None:
      guidance = w_range[0]
    elif not w_range[0] <= guidance <= w_range[1]:
      raise ValueError(f"--guidance={guidance:g} is outside [{w_range[0]:g}, {w_range[1]:g}], "
                       f"the guidance range {self.workdir} was trained on")
    if self.student_steps is None:
      return generation.SamplerSpec(sampler or self.config.sample_sampler,
                                    steps or int(self.config.sample_steps), x_var, guidance,
                                    spacing=spacing, final_step=final_step)
    counts = self.step_counts
    if len(counts) > 1 and steps not in counts:
      raise ValueError(f"{self.workdir} is an any-step Multistep CM for {counts} steps; pass "
                       f"--steps with one of them")
    if len(counts) == 1 and steps and steps != counts[0]:
      raise ValueError(f"{self.workdir} is a {counts[0]}-step Multistep CM; --steps="
                       f"{steps} does not match it (omit --steps)")
    for flag, value in (("sampler", sampler), ("spacing", spacing != "uniform"),
                        ("final_step", final_step)):
      if value:
        raise ValueError(f"--{flag} applies to diffusion runs; a Multistep CM samples with "
                         f"DDIM between its segment boundaries (Algorithm 2)")
    s = steps or counts[0]
    return generation.SamplerSpec("mcm", s, guidance=guidance, boundaries=self.boundaries(s),
                                  student=config_build.student_name(self.config),
                                  step_index=counts.index(s),
                                  guidance_input=w_range is not None)

  def training_examples(self, num_examples: int, seed: int):
    """`(data, conditioning or None)`: up to `num_examples` distinct training examples, drawn
    with `seed` (for aDDIM's x_var table); the conditioning is conditioning.from_batch's."""
    source = config_build.make_source(self.config)
    rng = np.random.default_rng(seed)
    idx = np.sort(rng.choice(len(source), min(num_examples, len(source)), replace=False))
    batch = source.get(idx)
    return batch[config_build.data_key(self.config)], conditioning.from_batch(self.model, batch)

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
  model = config_build.get_model(config)
  schedule = config_build.get_schedule(config)
  replicated = sharding.replicated(sharding.data_mesh() if mesh is None else mesh)
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
