"""Evaluation during training (`config.evals`): sample quality and the student's ODE error.

At `config.evals.every_steps`, the trainer draws `num_samples` samples with the run's
own sampler (the student's S steps, or the diffusion sampler) from the EMA weights and
fixed noise, and logs to TensorBoard:
  * `eval/<metric>`: the dataset's metric (sample_metrics.py: digits FD and accuracy,
    mixture energy distance, or FID/IS);
  * `eval/ode_error` (students with a teacher): the RMS distance between the student's
    samples and the teacher's `ode_steps`-step DDIM solve of the probability-flow ODE
    from the same noise and labels: the Direct-CM paper's metric (spec §10.4).
"""
import jax
import numpy as np

from multistep_cm import generation
from multistep_cm.evaluation import sample_metrics


class TrainingEvaluator:
  """Called as `evaluator(params) -> {name: value}`; built once per run."""

  def __init__(self, config, model, schedule, mesh, teacher_params=None, teacher_model=None):
    ec = config.evals
    self.config, self.model, self.schedule, self.mesh = config, model, schedule, mesh
    self.num_samples = int(ec.get("num_samples", 1000))
    self.batch_size = int(ec.get("batch_size", 500))
    self.seed = int(config.seed) + 2**16
    # An any-step run is evaluated at each of its step counts.
    counts = tuple(config.loss.get("anystep_counts", ()))
    self.specs = ([generation.spec_for_config(config, s) for s in counts] if counts
                  else [generation.spec_for_config(config)])
    self.metric = sample_metrics.make_metric(
        config, ec.get("metric", "auto"), ec.get("inception_weights", ""),
        ec.get("reference_stats", ""))
    self.labels = None
    if getattr(model, "num_classes", 0):
      self.labels = np.arange(self.num_samples, dtype=np.int32) % model.num_classes
    self.teacher_samples = None
    if (ec.get("ode_error", True) and teacher_params is not None
        and config.loss.mode != "diffusion"):
      # The teacher is fixed, so its solve is computed once.
      spec = generation.SamplerSpec("ddim", int(ec.get("ode_steps", 256)))
      self.teacher_samples, _ = self._generate(teacher_params, spec, teacher_model or model)

  def _generate(self, params, spec, model=None):
    return generation.generate(model or self.model, params, self.schedule, spec,
                               self.num_samples, seed=self.seed, batch_size=self.batch_size,
                               labels=self.labels, mesh=self.mesh)

  def __call__(self, params) -> dict[str, float]:
    out = {}
    for spec in self.specs:
      suffix = f"/S{spec.steps}" if len(self.specs) > 1 else ""
      samples, labels = self._generate(params, spec)
      if self.metric is not None:
        out.update({f"eval/{k}{suffix}": float(v)
                    for k, v in self.metric(samples, labels).items()})
      if self.teacher_samples is not None:
        out[f"eval/ode_error{suffix}"] = float(
            np.sqrt(np.mean(np.square(samples - self.teacher_samples))))
    return out


def enabled(config) -> bool:
  return bool(config.get("evals", {}).get("every_steps", 0))
