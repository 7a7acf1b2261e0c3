"""What the trainer evaluates while it trains: sample grids, sample quality, ODE error.

  * Sample grids (`SampleGrid`, every `config.sample_every_steps`): `config.sample_num`
    samples of the EMA weights from fixed noise with the run's own sampler, as one
    image for TensorBoard (and a PNG at the end of the run): upscaled tiles apart, a row
    per class with its label (images.image_grid).
  * Evaluations (`TrainingEvaluator`, every `config.evals.every_steps`): `num_samples`
    samples with the run's own sampler (the student's S steps, or the diffusion
    sampler at `evals.sample_steps` steps when set) from the EMA weights and fixed
    noise, logged as
      - `eval/<metric>`: the dataset's metric (sample_metrics.py: digits FD and
        accuracy, mixture energy distance, or FID/IS);
      - `eval/ode_error` (students with a teacher): the RMS distance between the
        student's samples and the teacher's `ode_steps`-step DDIM solve of the
        probability-flow ODE from the same noise and labels: the Direct-CM paper's
        metric (§10.4). CT trains without a teacher; its ODE error is measured
        against the diffusion run it started from (`evaluation_teacher`).
"""
import jax
import jax.numpy as jnp
import numpy as np

from multistep_cm.config import plan as plan_lib
from multistep_cm.evaluation import sample_metrics
from multistep_cm.models import conditioning
from multistep_cm.runtime import checkpointing
from multistep_cm.runtime import sharding
from multistep_cm.sampling import generation
from multistep_cm.sampling import images


class SampleGrid:
  """`grid(params) -> uint8 [H', W', C]`: the run's sampler on fixed noise, as a readable
  grid (images.image_grid); a class-conditional model gets one row per class, the label
  at its left."""

  def __init__(self, plan: plan_lib.RunPlan, mesh):
    config, model = plan.config, plan.model
    # Replicated output: every process can read the grid, also when the batch spans hosts.
    self._sample = jax.jit(generation.make_sample_fn(model, plan.schedule, _own_sampler(plan)),
                           out_shardings=sharding.replicated(mesh))
    # A latent model's grid shows the decoded images (the VAE's own jitted call, its
    # weights an argument rather than constants of this program).
    self._decode = plan.decode
    k_z, _ = jax.random.split(jax.random.PRNGKey(config.seed + 7))
    self._z = jax.random.normal(k_z, (config.sample_num,) + plan.example_shape)
    self._labels = self._row_labels = None
    self._class_names = plan.class_names  # a prepared image folder's, on the rows
    if conditioning.is_text(model):
      # One prompt from the training data per row, its caption at the row's left.
      rows = int(np.ceil(np.sqrt(config.sample_num)))
      cols = -(-config.sample_num // rows)
      cond, captions = plan.prompts(rows, seed=config.seed + 7)
      which = np.arange(config.sample_num) // cols
      self._labels = jax.tree.map(lambda a: jnp.asarray(a[which]), cond)
      self._row_labels = np.asarray(captions, dtype=object)[which]
    elif model.num_classes:
      # About square: sqrt(sample_num) classes (all of them when fewer) in equal rows.
      rows = min(model.num_classes, int(np.ceil(np.sqrt(config.sample_num))))
      cols = -(-config.sample_num // rows)
      self._labels = jnp.arange(config.sample_num, dtype=jnp.int32) // cols % model.num_classes
      self._row_labels = np.asarray(self._labels)

  def __call__(self, params) -> np.ndarray:
    samples = jax.device_get(self._sample(params, self._z, self._labels))
    if self._decode is not None:
      samples = np.asarray(self._decode(samples))
    return images.image_grid(samples, self._row_labels, class_names=self._class_names)


def _own_sampler(plan: plan_lib.RunPlan):
  """The sampler of the run's grids: the student's S (an any-step run's largest), or the
  configured diffusion sampler."""
  return plan.sampler(plan.student_steps or 0)


def make_sample_grid(plan: plan_lib.RunPlan, mesh) -> SampleGrid | None:
  """The run's sample grid, or None when grids are off or the data are not images."""
  if not plan.config.sample_every_steps or len(plan.example_shape) != 3:
    return None
  return SampleGrid(plan, mesh)


def enabled(plan: plan_lib.RunPlan) -> bool:
  return bool(plan.config.evals.every_steps)


def evaluation_teacher(plan: plan_lib.RunPlan, teacher_params, abstract_teacher):
  """The teacher the ODE error is measured against, or None.

  The run's own teacher (cd, direct); for CT, which trains without one, the diffusion
  run it started from: `config.teacher_checkpoint` if set, else `config.init_from`
  (loaded with `abstract_teacher`'s shapes and shardings).
  """
  config = plan.config
  if (teacher_params is not None or plan.objective is not plan_lib.Objective.CT
      or not config.evals.ode_error):
    return teacher_params
  if config.teacher_checkpoint:
    path, weights, key = config.teacher_checkpoint, config.teacher_weights, "teacher_checkpoint"
  elif config.init_from:
    path, weights, key = config.init_from, config.init_weights, "init_from"
  else:
    return None
  return checkpointing.load_params(path, abstract_teacher, weights, key=f"config.{key}")[0]


class TrainingEvaluator:
  """Called as `evaluator(params) -> {name: value}`; built once per run."""

  def __init__(self, plan: plan_lib.RunPlan, mesh, teacher_params=None, teacher_model=None):
    config, model = plan.config, plan.model
    ec = config.evals
    self.model, self.schedule, self.mesh = model, plan.schedule, mesh
    self.decode = plan.decode  # latents are scored (and the ODE error measured) as pictures
    self.num_samples = int(ec.num_samples)
    self.batch_size = int(ec.batch_size)
    self.seed = int(config.seed) + 2**16
    # A student is evaluated at each of its step counts (several for an any-step run).
    if plan.step_counts:
      self.specs = [plan.sampler(s) for s in plan.step_counts]
    else:  # diffusion: the run's sampler, at `sample_steps` unless evals set fewer (cost)
      self.specs = [plan.sampler(int(ec.sample_steps))]
    self.metric = sample_metrics.make_metric(config, ec.metric, ec.inception_weights,
                                             ec.reference_stats,
                                             dinov2_weights=ec.dinov2_weights)
    self.labels = self.captions = None
    if conditioning.is_text(model):
      # Prompts from the training data; the metric judges samples against their captions.
      self.labels, self.captions = plan.prompts(self.num_samples, self.seed)
    elif getattr(model, "num_classes", 0):
      self.labels = np.arange(self.num_samples, dtype=np.int32) % model.num_classes
    self.teacher_samples = None
    if ec.ode_error and teacher_params is not None and plan.objective.is_student:
      # The teacher is fixed, so its solve is computed once.
      spec = generation.SamplerSpec("ddim", int(ec.ode_steps))
      self.teacher_samples, _ = self._generate(teacher_params, spec, teacher_model or model)

  def _generate(self, params, spec, model=None):
    return generation.generate(model or self.model, params, self.schedule, spec,
                               self.num_samples, seed=self.seed, batch_size=self.batch_size,
                               labels=self.labels, mesh=self.mesh, decode=self.decode)

  def __call__(self, params) -> dict[str, float]:
    out = {}
    for spec in self.specs:
      suffix = f"/S{spec.steps}" if len(self.specs) > 1 else ""
      samples, labels = self._generate(params, spec)
      if self.metric is not None:
        judged_by = labels if self.captions is None else self.captions
        out.update({f"eval/{k}{suffix}": float(v)
                    for k, v in self.metric(samples, judged_by).items()})
      if self.teacher_samples is not None:
        out[f"eval/ode_error{suffix}"] = float(
            np.sqrt(np.mean(np.square(samples - self.teacher_samples))))
    return out
