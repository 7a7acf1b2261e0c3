"""Sampling many examples from a model, sharded over every device and host.

One `SamplerSpec` names how samples are drawn (Multistep CM student steps, or a
diffusion sampler with its step count, time spacing, x_var rule and aDDIM's final
step), so every report can say exactly what produced its samples. Noise for the b-th
batch is drawn from `fold_in(k, b)` with `k` the first half of `split(PRNGKey(seed))`
(random labels come from the second): a seed and batch size give the same samples on
any number of devices or hosts.
"""
import dataclasses
import math
from typing import Callable

import jax
import jax.numpy as jnp
from jax.experimental import multihost_utils
import numpy as np
import tqdm

from multistep_cm import conditioning
from multistep_cm import config_build
from multistep_cm import denoiser
from multistep_cm import sharding
from multistep_cm.diffusion import sampling
from multistep_cm.diffusion import solvers

KINDS = ("mcm",) + sampling.SAMPLERS
X_VAR_RULES = ("analytic", "table")
_NAMES = {"ddim": "DDIM", "addim": "aDDIM", "euler": "Euler", "heun": "Heun"}


@dataclasses.dataclass(frozen=True)
class SamplerSpec:
  """`kind`: 'mcm' (Algorithm 2, `steps` = S), or a diffusion sampler of
  `sampling.SAMPLERS` (`steps` = K steps on the `spacing` grid; Heun costs 2K - 1 NFE)."""
  kind: str
  steps: int
  x_var: str = "analytic"  # aDDIM: 'analytic' (0.1 / (2 + SNR)) or 'table' (from data)
  guidance: float = 0.0
  boundaries: tuple[float, ...] | None = None  # MCM: segment boundaries (None: equal)
  step_index: int | None = None  # any-step students told their step count: its index
  spacing: str = "uniform"  # diffusion samplers: 'uniform' in t or 'karras'
  final_step: str | None = None  # aDDIM's last step (None: sampling.DEFAULT_FINAL_STEP)
  student: str = "Multistep CM"  # 'mcm': what the student is (config_build.student_name)
  # A guidance-conditioned student (issue 18) is told `guidance` (one forward per step)
  # instead of running the classifier-free guidance pair.
  guidance_input: bool = False

  def __post_init__(self):
    if self.kind not in KINDS:
      raise ValueError(f"sampler must be one of {KINDS}, got {self.kind!r}")
    if self.steps < 1:
      raise ValueError(f"sampler steps must be >= 1, got {self.steps}")
    if self.x_var not in X_VAR_RULES:
      raise ValueError(f"x_var must be one of {X_VAR_RULES}, got {self.x_var!r}")
    if self.spacing not in sampling.SPACINGS:
      raise ValueError(f"spacing must be one of {sampling.SPACINGS}, got {self.spacing!r}")
    if self.kind == "mcm" and self.spacing != "uniform":
      raise ValueError("a Multistep CM samples on its segment boundaries; spacing applies to "
                       "diffusion samplers")
    if self.guidance_input and self.kind != "mcm":
      raise ValueError("only a Multistep CM student can be told its guidance scale")
    if self.final_step is not None and (self.kind != "addim"
                                        or self.final_step not in sampling.FINAL_STEPS):
      raise ValueError(f"final_step applies to aDDIM only and must be one of "
                       f"{sampling.FINAL_STEPS}, got {self.final_step!r} for {self.kind!r}")

  @property
  def nfe(self) -> int:
    """Network evaluations per sample (guidance runs both halves as one batch; a student
    told w runs one)."""
    return self.steps if self.kind == "mcm" else sampling.nfe(self.kind, self.steps)

  def describe(self) -> str:
    if self.kind == "mcm":
      text = f"{self.student}, {self.steps} step{'s' * (self.steps > 1)} (DDIM, Algorithm 2)"
      equal = tuple(k / self.steps for k in range(self.steps + 1))
      if self.boundaries is not None and not np.allclose(self.boundaries, equal):
        text += ", boundaries " + "/".join(f"{b:.3g}" for b in self.boundaries)
    else:
      text = f"{_NAMES[self.kind]}, {self.steps} step{'s' * (self.steps > 1)}"
      if self.spacing != "uniform":
        text += f", {self.spacing} spacing"
      if self.kind == "addim":
        text += f", x_var {'0.1/(2+SNR)' if self.x_var == 'analytic' else 'table from data'}"
        text += f", {self.final_step or sampling.DEFAULT_FINAL_STEP} last step"
    if self.guidance_input:
      text += f", told guidance w = {self.guidance:g}"
    elif self.guidance:
      text += f", guidance {self.guidance}"
    return text


def spec_for_config(config, student_steps: int | None = None) -> SamplerSpec:
  """The sampler a run uses for its own grids and evals: the student's S (or, for any-step
  runs, `student_steps`, default the largest), or the configured diffusion sampler."""
  if not config_build.is_student(config):
    return SamplerSpec(config.sample_sampler, int(config.sample_steps))
  counts = config_build.step_counts(config)
  s = max(counts) if student_steps is None else int(student_steps)
  bounds = tuple(config_build.trained_boundaries(config)[str(s)])
  w_range = config_build.guidance_range(config)
  return SamplerSpec("mcm", s, boundaries=bounds, student=config_build.student_name(config),
                     step_index=counts.index(s) if len(counts) > 1 else 0,
                     guidance=w_range[0] if w_range else 0.0,
                     guidance_input=w_range is not None)


def make_sample_fn(model, schedule, spec: SamplerSpec, x_var_table=None) -> Callable:
  """`sample(params, z, labels) -> x` (pure, jit-able)."""
  if spec.kind == "addim" and spec.x_var == "table" and x_var_table is None:
    raise ValueError("aDDIM with x_var='table' needs an x_var table (estimate_x_var_table)")

  # A student told w runs no guided pair: its one forward already follows the guided teacher.
  cfg_scale, told_w = (0.0, spec.guidance) if spec.guidance_input else (spec.guidance, None)

  def sample(params, z, labels):
    f = denoiser.make_denoise_fn(model, params, schedule, labels, guidance_scale=cfg_scale,
                                 guidance_input=told_w)
    if spec.kind == "mcm" and getattr(model, "segment_cond", "none") != "none":
      def told_its_segment(z, t, t_step):  # the start of the segment this step lands on
        segment = denoiser.segment_input(model, schedule, t_step[0], spec.step_index)
        return denoiser.make_denoise_fn(model, params, schedule, labels, cfg_scale,
                                        segment=segment, guidance_input=told_w)(z, t)
      return sampling.sample_mcm(told_its_segment, z, schedule, spec.steps, spec.boundaries,
                                 segment_aware=True)
    if spec.kind == "mcm":
      return sampling.sample_mcm(f, z, schedule, spec.steps, spec.boundaries)
    x_var = x_var_table if spec.x_var == "table" else None
    return sampling.sample(f, z, schedule, spec.steps, spec.kind, x_var, spec.spacing,
                           spec.final_step)

  return sample


def _round_up(n: int, k: int) -> int:
  return int(math.ceil(n / k) * k)


def generate(model, params, schedule, spec: SamplerSpec, num_samples: int, *, seed: int = 0,
             batch_size: int = 256, labels=None, x_var_table=None, mesh=None,
             progress: bool = False):
  """Draws `num_samples` samples; returns `(samples float32 [-1, 1]-ish, labels or None)`.

  Args:
    model, params, schedule: the network, its (replicated) parameters and schedule.
    spec: the sampler.
    num_samples: how many.
    seed: noise and random labels come from it.
    batch_size: global batch per call (rounded up to a multiple of the device count).
    labels: for a class-conditional model: None (uniformly random classes), or an
      int array of `num_samples` class ids; for a text model (conditioning.py), the dict
      of `num_samples` prompts' `text_embedding` [N, L, D] and `text_mask` [N, L].
    x_var_table: aDDIM's per-t table when `spec.x_var == 'table'`.
    mesh: the devices to use, the batch split over all its axes (default: all devices).
    progress: show a progress bar.
  """
  if mesh is None:
    mesh = sharding.data_mesh()
  num_devices = mesh.devices.size
  batch_size = _round_up(min(batch_size, _round_up(num_samples, num_devices)), num_devices)
  num_batches = int(math.ceil(num_samples / batch_size))
  total = num_batches * batch_size
  conditional = conditioning.is_conditional(model)
  key, label_key = jax.random.split(jax.random.PRNGKey(seed))
  if conditional:
    if labels is None and conditioning.is_text(model):
      raise ValueError("a text-conditioned model samples from prompts: pass their "
                       "text_embedding and text_mask as `labels`")
    if labels is None:
      labels = np.asarray(jax.random.randint(label_key, (total,), 0, model.num_classes))
    if not conditioning.is_text(model):
      labels = np.asarray(labels, np.int32)
    given = conditioning.batch_size(labels)
    if given < num_samples:
      raise ValueError(f"need {num_samples} labels or prompts, got {given}")
    # Pad the last batch by repeating the first rows (the padding is dropped below).
    labels = jax.tree.map(lambda a: np.take(np.asarray(a), np.arange(total) % given, axis=0),
                          labels)
  z_shape = tuple(model_input_shape(model))
  # The batch is split over every axis of the mesh (the trainer's is ('data', 'fsdp')).
  data_sharding = jax.sharding.NamedSharding(
      mesh, jax.sharding.PartitionSpec(tuple(mesh.axis_names)))

  sample = make_sample_fn(model, schedule, spec, x_var_table)

  @jax.jit
  def one_batch(params, b, lbl):
    z = jax.random.normal(jax.random.fold_in(key, b), (batch_size,) + z_shape)
    z = jax.lax.with_sharding_constraint(z, data_sharding)
    return sample(params, z, lbl)

  out = []
  for b in tqdm.trange(num_batches, disable=not progress, desc=spec.describe()):
    lbl = None
    if conditional:
      lbl = jax.device_put(jax.tree.map(lambda a: a[b * batch_size:(b + 1) * batch_size],
                                        labels), data_sharding)
    x = one_batch(params, b, lbl)
    out.append(np.asarray(multihost_utils.process_allgather(x, tiled=True)))
  samples = np.concatenate(out)[:num_samples]
  return samples, (jax.tree.map(lambda a: a[:num_samples], labels) if conditional else None)


def model_input_shape(model) -> tuple[int, ...]:
  """The per-example input shape of a denoiser: [H, W, C] or [D]."""
  if hasattr(model, "image_size"):
    return (model.image_size, model.image_size, model.num_channels)
  return (model.data_dim,)


def estimate_table(model, params, schedule, data, labels=None, seed: int = 0,
                   eta: float = 0.75, num_points: int = 64):
  """aDDIM's x_var table from a batch of real data (Algorithm 3's precomputation).

  A class-conditional model is measured with the data's labels (else the null class),
  as it will be conditioned when sampling.
  """
  if not conditioning.is_conditional(model):
    labels = None
  elif labels is None:
    labels = denoiser.null_labels(model, data.shape[0])
  f = denoiser.make_denoise_fn(model, params, schedule,
                               labels=jax.tree.map(jnp.asarray, labels))
  return jax.jit(lambda x: solvers.estimate_x_var_table(
      f, x, jax.random.PRNGKey(seed), schedule, num_points=num_points, eta=eta))(
          jnp.asarray(data))
