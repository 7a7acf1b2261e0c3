"""A run's plan: its config resolved once into what the config means.

`RunPlan.from_config` is called once by the trainer, on the config it validated;
`RunPlan.from_run` once by the sampling commands, on a workdir's `config.json` and the
checkpoint's metadata (a run written before a key existed resolves with that key's
default). Everything below `main` takes the plan: its objective (`Objective`), example
shape, step counts, segment boundaries and guidance range are derived here and nowhere
else, and `plan.config` holds the raw hyperparameters, read-only, every default filled
once (config/base.py: `with_defaults`). A student's sampler has one constructor, `plan.sampler`, and a
checkpoint's metadata is written from the plan (`plan.checkpoint_meta`).
"""
import dataclasses
import enum
import functools

import ml_collections

from multistep_cm.config import base as config_base
from multistep_cm.config import build as config_build
from multistep_cm.config import sampler as sampler_lib
from multistep_cm.data import latents
from multistep_cm.diffusion import losses


class Objective(str, enum.Enum):
  """What a run trains: a diffusion model, a Multistep CM (§3, §10) or a PD halving (§14)."""
  DIFFUSION = "diffusion"
  CT = "ct"
  CD = "cd"
  DIRECT = "direct"
  PD = "pd"

  @property
  def is_student(self) -> bool:
    """A few-step student, as opposed to diffusion (teacher) training. Every student
    samples with DDIM between its segment boundaries (Algorithm 2, §4); a PD student's are
    its N uniform steps."""
    return self is not Objective.DIFFUSION

  @property
  def needs_teacher(self) -> bool:
    """Whether the loss calls a teacher network (config.teacher_checkpoint is required)."""
    return self.value in losses.TEACHER_MODES

  @property
  def is_mcm(self) -> bool:
    """A Multistep CM objective (ct, cd, direct): segment-wise targets (Algorithm 1)."""
    return self.value in losses.MCM_MODES

  @property
  def student_name(self) -> str:
    """What a student is called in sampler descriptions and reports."""
    return "PD student" if self is Objective.PD else "Multistep CM"

  @property
  def teacher_objectives(self) -> tuple["Objective", ...]:
    """The objectives a teacher checkpoint of this run may have been trained with: a
    diffusion model, or for a PD halving also the previous halving's student."""
    return ((Objective.DIFFUSION, Objective.PD) if self is Objective.PD
            else (Objective.DIFFUSION,))


def _equal_boundaries(s: int) -> tuple[float, ...]:
  return tuple(float(k) / s for k in range(s + 1))


@dataclasses.dataclass(frozen=True)
class RunPlan:
  """What a validated config means. Build it with `from_config` or `from_run`."""
  config: ml_collections.FrozenConfigDict  # every key, defaults filled, read-only
  objective: Objective
  example_shape: tuple[int, ...]  # one training example: [H, W, C] or [D]
  data_key: str  # the batch key of the data: 'image', or 'x' for vectors
  step_counts: tuple[int, ...]  # a student's S, or an any-step run's set; () for diffusion
  # {S: the boundaries S samples with}: snapped to the final teacher grid (what the
  # trainer stores in every checkpoint); {} for diffusion.
  boundaries: dict[int, tuple[float, ...]]
  guidance_range: tuple[float, float] | None  # a guidance-conditioned student's (w_min, w_max)

  @classmethod
  def from_config(cls, config: ml_collections.ConfigDict) -> "RunPlan":
    """The plan of a config (one run, not a staged root), checked by config/checks.py."""
    config = config_base.with_defaults(config)
    objective = Objective(config.loss.mode)
    boundaries = {}
    if objective.is_student:
      boundaries = {int(s): tuple(float(b) for b in v)
                    for s, v in config_build.trained_boundaries(config).items()}
    return cls._build(config, objective, boundaries,
                      config_build.guidance_range(config) if objective.is_student else None)

  @classmethod
  def from_run(cls, config: ml_collections.ConfigDict, meta: dict) -> "RunPlan":
    """The plan of a trained run: its `config.json` and one checkpoint's metadata.

    The boundaries and guidance range come from the metadata, as the checkpoint was
    trained; a checkpoint written before boundaries were stored samples with equal
    segments (all that could be trained then).
    """
    config = config_base.with_defaults(config)
    objective = Objective(config.loss.mode)
    boundaries, w_range = {}, None
    if objective.is_student:
      stored = meta.get("segment_boundaries") or {}
      counts = config_build.step_counts(config)
      boundaries = {s: tuple(float(b) for b in stored.get(str(s), _equal_boundaries(s)))
                    for s in counts}
      w = meta.get("guidance_range") or config_build.guidance_range(config)
      w_range = (float(w[0]), float(w[1])) if w else None
    return cls._build(config, objective, boundaries, w_range)

  @classmethod
  def _build(cls, config, objective, boundaries, w_range) -> "RunPlan":
    return cls(config=ml_collections.FrozenConfigDict(config), objective=objective,
               example_shape=config_build.example_shape(config),
               data_key=config_build.data_key(config),
               step_counts=config_build.step_counts(config), boundaries=boundaries,
               guidance_range=w_range)

  # --- what the plan builds -----------------------------------------------------------------

  @functools.cached_property
  def schedule(self):
    """The noise schedule (§1.2)."""
    return config_build.get_schedule(self.config)

  @functools.cached_property
  def model(self):
    """The network (models/presets.py with the config's overrides)."""
    return config_build.get_model(self.config)

  @functools.cached_property
  def teacher_model(self):
    """The network the student distils or starts from: our diffusion run's architecture,
    or the teacher's own module in its frame (config.teacher, config/build.py)."""
    return config_build.teacher_model(self.config, self.model)

  def make_source(self):
    """The training data source (config/build.py: `make_source`)."""
    return config_build.make_source(self.config)

  @functools.cached_property
  def class_names(self) -> tuple[str, ...] | None:
    """The data's class names for sample-grid rows (a prepared image folder's), else None."""
    return config_build.class_names(self.config)

  @functools.cached_property
  def decode(self):
    """`decode(x) -> images` of a model of VAE latents (data/latents.py: the record's VAE),
    applied wherever samples become pictures or are scored; None for data in pixels."""
    return latents.decoder(self.config)

  def prompts(self, num: int, seed: int = 0):
    """`(conditioning, captions)` of `num` training examples drawn by `seed`: what a text
    model's grids and evaluations sample from (config/build.py: `prompts`)."""
    return config_build.prompts(self.config, num, seed)

  @property
  def student_steps(self) -> int | None:
    """S of a student (the largest of an any-step run's set), None for diffusion."""
    return max(self.step_counts) if self.step_counts else None

  # --- sampling -------------------------------------------------------------------------------

  def sampler(self, steps: int = 0, guidance: float | None = None, *, sampler: str | None = None,
              x_var: str = "analytic", spacing: str = "uniform",
              final_step: str | None = None,
              name: str = "this run", flag=lambda arg: f"--{arg}") -> sampler_lib.SamplerSpec:
    """The sampler of this run for the given choices (0 / None: the run's own).

    A student samples its own S (an any-step student must be told one of its set) with
    DDIM between its boundaries (Algorithm 2); a student trained on a range of guidance scales
    is told `guidance` (None: the range's lower end w_min). A diffusion run samples with
    `sampler` (default the configured `sample_sampler`) for `steps` (default
    `sample_steps`). `name` is what error messages call the run, `flag(argument)` how they
    name an argument: a command's `--steps`, by default, or a library call's `steps`.

    Raises:
      ValueError: the choices do not fit the run (a step count the student was not
        trained for, a diffusion sampler's options for a student, a guidance scale
        outside the range it was trained on).
    """
    w_range = self.guidance_range
    if w_range is None:
      guidance = guidance or 0.0
    elif guidance is None:
      guidance = w_range[0]
    elif not w_range[0] <= guidance <= w_range[1]:
      raise ValueError(f"{flag('guidance')}={guidance:g} is outside [{w_range[0]:g}, "
                       f"{w_range[1]:g}], the guidance range {name} was trained on")
    if not self.objective.is_student:
      return sampler_lib.SamplerSpec(sampler or self.config.sample_sampler,
                                     steps or int(self.config.sample_steps), x_var, guidance,
                                     spacing=spacing, final_step=final_step)
    counts = self.step_counts
    if len(counts) > 1 and steps not in counts:
      raise ValueError(f"{name} is an any-step Multistep CM for {counts} steps; pass "
                       f"{flag('steps')} with one of them")
    if len(counts) == 1 and steps and steps != counts[0]:
      raise ValueError(f"{name} is a {counts[0]}-step Multistep CM; {flag('steps')}={steps} "
                       f"does not match it (omit {flag('steps')})")
    for option, value in (("sampler", sampler), ("spacing", spacing != "uniform"),
                          ("final_step", final_step)):
      if value:
        raise ValueError(f"{flag(option)} applies to diffusion runs; a Multistep CM samples "
                         f"with DDIM between its segment boundaries (Algorithm 2)")
    s = steps or counts[0]
    return sampler_lib.SamplerSpec("mcm", s, guidance=guidance, boundaries=self.boundaries[s],
                                   student=self.objective.student_name,
                                   step_index=counts.index(s),
                                   guidance_input=w_range is not None)

  # --- checkpoints ----------------------------------------------------------------------------

  @property
  def model_name(self) -> str:
    """The network trained, as checkpoints record it: `teacher:<module>` for the teacher's
    own module (`teacher.student='teacher'`), else our `model.preset`."""
    c = self.config
    return f"teacher:{c.teacher.module}" if c.teacher.student == "teacher" else c.model.preset

  def checkpoint_meta(self, step: int) -> dict:
    """Saved beside every checkpoint: what a resume checks and the sampling commands read."""
    c, student = self.config, self.objective.is_student
    return {"step": step, "input_position": step, "batch_size": c.batch_size,
            "seed": c.seed, "ema_decays": list(c.ema_decays),
            "model": self.model_name, "mode": self.objective.value,
            "student_steps": c.loss.student_steps if student else None,
            "anystep_counts": list(c.loss.anystep_counts),
            "segment_boundaries": ({str(s): list(b) for s, b in self.boundaries.items()}
                                   if student else None),
            "guidance_range": list(self.guidance_range) if self.guidance_range else None,
            "schedule": c.schedule.to_dict(), "dataset": c.data.dataset}
