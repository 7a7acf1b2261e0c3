"""The Python interface, for notebooks and scripts: a trained run, its samples, their grid
and their score, with one import.

    from multistep_cm import api
    run = api.load("/tmp/mcm_digits/cd4")          # a run's workdir (a stage of a staged root)
    samples = run.sample(64, seed=0)                 # the student's own S; any sampler for a teacher
    samples.images                                   # uint8 [64, H, W, C]; samples.labels
    api.save_png(samples.grid(), "cd4.png")          # one row per class, labelled
    run.evaluate(num_samples=1000)                   # the data's metric: {"fd": ..., ...}

What `sample` and `evaluate` do on the command line, without flags: errors are ValueErrors
(`api.InputError` for a run or a choice that does not fit what is on disk, with the
argument's name), never an exit. Everything here is a thin layer over
`multistep_cm.sampling` (runs, generation, images) and `multistep_cm.evaluation`
(`sample_metrics`), which the commands use too.
"""
import dataclasses
from typing import Any

import numpy as np

from multistep_cm.evaluation import sample_metrics
from multistep_cm.sampling import generation
from multistep_cm.sampling import images as images_lib
from multistep_cm.sampling import runs

InputError = runs.InputError
save_png = images_lib.save_png


def _argument(name: str) -> str:
  """How errors name an argument of these functions: as it is spelled in the call."""
  return name


@dataclasses.dataclass(frozen=True)
class Samples:
  """Samples of a run: `x` float32 in [-1, 1] as the network drew them, their `labels`
  (class ids, a text model's prompts, or None) and the data's `class_names` (or None)."""
  x: np.ndarray
  labels: Any = None
  class_names: tuple[str, ...] | None = None

  @property
  def images(self) -> np.ndarray:
    """uint8 `[N, H, W, C]` (images.to_uint8: the standard rounding of [-1, 1])."""
    return images_lib.to_uint8(self.x)

  def grid(self, max_images: int = 100) -> np.ndarray:
    """One uint8 picture of the first `max_images` samples: a row per class (or prompt), its
    label at the left (images.image_grid)."""
    labels = None if self.labels is None or isinstance(self.labels, dict) else (
        np.asarray(self.labels)[:max_images])
    return images_lib.image_grid(self.x[:max_images], labels, class_names=self.class_names)


class Run:
  """A trained run: `sample` and `evaluate` with any allowed step count and sampler."""

  def __init__(self, loaded: runs.Run):
    self._run = loaded

  @property
  def workdir(self) -> str:
    return self._run.workdir

  @property
  def plan(self):
    """What the run is (config/plan.py: `RunPlan`): objective, shapes, step counts."""
    return self._run.plan

  @property
  def config(self):
    """Its hyperparameters, every default filled, read-only."""
    return self._run.config

  @property
  def step(self) -> int:
    """The training step of the loaded checkpoint."""
    return self._run.step

  @property
  def step_counts(self) -> tuple[int, ...]:
    """The step counts a student samples with (its S, or an any-step set); () for a teacher."""
    return self._run.step_counts

  def __repr__(self) -> str:
    kind = (f"a {self.plan.objective.value} student for {self.step_counts} steps"
            if self.step_counts else "a diffusion model")
    return f"<Run {self.workdir}: {kind}, {self._run.describe_weights()}>"

  def sampler(self, steps: int = 0, sampler: str | None = None, guidance: float | None = None,
              spacing: str = "uniform", x_var: str = "analytic"):
    """The `SamplerSpec` these choices give (0 / None: the run's own).

    Raises:
      ValueError: the choices do not fit the run, naming the argument (`steps`, ...).
    """
    return self._run.sampler_spec(steps, sampler, x_var=x_var, guidance=guidance,
                                  spacing=spacing, flag=_argument)

  def sample(self, num: int, *, steps: int = 0, sampler: str | None = None,
             guidance: float | None = None, labels=None, seed: int = 0,
             spacing: str = "uniform", batch_size: int = 256,
             progress: bool = False) -> Samples:
    """`num` samples with the run's own sampler, or the one these choices give.

    Args:
      num: how many.
      steps, sampler, guidance, spacing: as `sample --steps ...` takes them (`sampler`,
        `spacing`: diffusion runs only; a student samples its own S, or one of an any-step
        student's counts).
      labels: class ids `[num]` (default: uniformly random classes), or for a text model
        the dict of `text_embedding` [num, L, D] and `text_mask` [num, L] (default: `num`
        prompts of its training data).
      seed: the noise, the random labels and the prompts come from it.
      batch_size: the global batch of each sampling call.
      progress: show a progress bar.

    Raises:
      ValueError: a choice that does not fit the run, or samples that are not finite (the
        weights are damaged; another checkpoint may load, `load(..., step=)`).
    """
    if isinstance(num, bool) or not isinstance(num, int) or num < 1:
      raise ValueError(f"num must be a positive integer, got {num!r}")
    spec = self.sampler(steps, sampler, guidance, spacing)
    if labels is None and self.plan.config.data.text_dim > 0:
      labels, _ = self.plan.prompts(num, seed)
    x, drawn = generation.generate(self._run.model, self._run.params, self._run.schedule, spec,
                                   num, seed=seed, batch_size=batch_size, labels=labels,
                                   progress=progress, decode=self.plan.decode)
    if not np.all(np.isfinite(x)):
      raise ValueError(f"the samples of {self.workdir} (checkpoint step {self.step}, "
                       f"{self._run.weights}) are not finite: its weights are damaged; load "
                       f"another checkpoint with load(..., step=)")
    return Samples(np.asarray(x, np.float32), drawn, self.plan.class_names)

  def evaluate(self, num_samples: int = 1000, *, steps: int = 0, metric: str = "auto",
               seed: int = 0, inception_weights: str = "", reference_stats: str = "",
               **sampling) -> dict[str, Any]:
    """The data's metric (`metric='auto'`, evaluation/sample_metrics.py: the digits
    classifier's Fréchet distance for the digits, FID where reference statistics are
    given, ...) of `num_samples` samples drawn as `sample` draws them.

    Raises:
      ValueError: the metric cannot be computed for this run (naming what it needs).
    """
    scorer = sample_metrics.make_metric(self.config, metric, inception_weights,
                                        reference_stats)
    samples = self.sample(num_samples, steps=steps, seed=seed, **sampling)
    labels = None if isinstance(samples.labels, dict) else samples.labels
    return dict(scorer(samples.x, labels))


def load(workdir: str, *, weights: str = "ema0", step: int | None = None) -> Run:
  """The run trained in `workdir` (a stage's directory of a staged root), one set of weights
  (`'params'` or an EMA name) of one checkpoint (default the latest), on all devices.

  Raises:
    InputError: `workdir` is not a run (a staged root: the error names its stages), or has
      no such checkpoint step or weights, naming the argument and what exists.
    CheckpointError: the checkpoint cannot be read.
  """
  runs.check_run(workdir, weights, step, flag=_argument)
  return Run(runs.load_run(workdir, weights, step))


def grid(samples: Samples | np.ndarray, labels=None, class_names=None) -> np.ndarray:
  """A uint8 picture of samples (a `Samples`, or float images in [-1, 1]), a row per label."""
  if isinstance(samples, Samples):
    return samples.grid()
  return images_lib.image_grid(np.asarray(samples, np.float32), labels, class_names=class_names)
