"""Sampling many examples from a model, sharded over every device and host.

One `SamplerSpec` names how samples are drawn (Multistep CM student steps, or a
diffusion sampler with its step count and x_var rule), so every report can say
exactly what produced its samples. Noise for the b-th batch is drawn from
`fold_in(k, b)` with `k` the first half of `split(PRNGKey(seed))` (random labels come
from the second): a seed and batch size give the same samples on any number of
devices or hosts.
"""
import dataclasses
import math
from typing import Callable

import jax
import jax.numpy as jnp
from jax.experimental import multihost_utils
import numpy as np
import tqdm

from multistep_cm import denoiser
from multistep_cm.diffusion import sampling
from multistep_cm.diffusion import solvers

KINDS = ("mcm", "ddim", "addim")
X_VAR_RULES = ("analytic", "table")


@dataclasses.dataclass(frozen=True)
class SamplerSpec:
  """`kind`: 'mcm' (Algorithm 2, `steps` = S), 'ddim' or 'addim' (diffusion, `steps` = K)."""
  kind: str
  steps: int
  x_var: str = "analytic"  # aDDIM: 'analytic' (0.1 / (2 + SNR)) or 'table' (from data)
  guidance: float = 0.0
  boundaries: tuple[float, ...] | None = None  # MCM: segment boundaries (None: equal)
  step_index: int | None = None  # any-step students told their step count: its index

  def __post_init__(self):
    if self.kind not in KINDS:
      raise ValueError(f"sampler must be one of {KINDS}, got {self.kind!r}")
    if self.steps < 1:
      raise ValueError(f"sampler steps must be >= 1, got {self.steps}")
    if self.x_var not in X_VAR_RULES:
      raise ValueError(f"x_var must be one of {X_VAR_RULES}, got {self.x_var!r}")

  def describe(self) -> str:
    if self.kind == "mcm":
      text = f"Multistep CM, {self.steps} step{'s' * (self.steps > 1)} (DDIM, Algorithm 2)"
      equal = tuple(k / self.steps for k in range(self.steps + 1))
      if self.boundaries is not None and not np.allclose(self.boundaries, equal):
        text += ", boundaries " + "/".join(f"{b:.3g}" for b in self.boundaries)
    else:
      text = f"{self.kind.upper() if self.kind == 'ddim' else 'aDDIM'}, {self.steps} steps"
      if self.kind == "addim":
        text += f", x_var {'0.1/(2+SNR)' if self.x_var == 'analytic' else 'table from data'}"
    if self.guidance:
      text += f", guidance {self.guidance}"
    return text


def spec_for_config(config, student_steps: int | None = None) -> SamplerSpec:
  """The sampler a run uses for its own grids and evals: the student's S (or, for any-step
  runs, `student_steps`, default the largest), or the configured diffusion sampler."""
  if config.loss.mode == "diffusion":
    return SamplerSpec(config.sample_sampler, int(config.sample_steps))
  from multistep_cm import train  # pylint: disable=g-import-not-at-top
  counts = tuple(config.loss.anystep_counts) or (int(config.loss.student_steps),)
  s = max(counts) if student_steps is None else int(student_steps)
  bounds = tuple(train.trained_boundaries(config, train.get_schedule(config))[str(s)])
  return SamplerSpec("mcm", s, boundaries=bounds,
                     step_index=counts.index(s) if len(counts) > 1 else 0)


def make_sample_fn(model, schedule, spec: SamplerSpec, x_var_table=None) -> Callable:
  """`sample(params, z, labels) -> x` (pure, jit-able)."""
  if spec.kind == "addim" and spec.x_var == "table" and x_var_table is None:
    raise ValueError("aDDIM with x_var='table' needs an x_var table (estimate_x_var_table)")

  def sample(params, z, labels):
    f = denoiser.make_denoise_fn(model, params, schedule, labels, guidance_scale=spec.guidance)
    if spec.kind == "mcm" and getattr(model, "segment_cond", "none") != "none":
      def told_its_segment(z, t, t_step):  # the start of the segment this step lands on
        segment = denoiser.segment_input(model, schedule, t_step[0], spec.step_index)
        return denoiser.make_denoise_fn(model, params, schedule, labels, spec.guidance,
                                        segment=segment)(z, t)
      return sampling.sample_mcm(told_its_segment, z, schedule, spec.steps, spec.boundaries,
                                 segment_aware=True)
    if spec.kind == "mcm":
      return sampling.sample_mcm(f, z, schedule, spec.steps, spec.boundaries)
    x_var = x_var_table if spec.x_var == "table" else None
    return sampling.sample(f, z, schedule, spec.steps, spec.kind, x_var)

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
      int array of `num_samples` class ids.
    x_var_table: aDDIM's per-t table when `spec.x_var == 'table'`.
    mesh: the devices to use, the batch split over all its axes (default: all devices).
    progress: show a progress bar.
  """
  if mesh is None:
    mesh = jax.sharding.Mesh(jax.devices(), ("data",))
  num_devices = mesh.devices.size
  batch_size = _round_up(min(batch_size, _round_up(num_samples, num_devices)), num_devices)
  num_batches = int(math.ceil(num_samples / batch_size))
  total = num_batches * batch_size
  conditional = bool(getattr(model, "num_classes", 0))
  key, label_key = jax.random.split(jax.random.PRNGKey(seed))
  if conditional:
    if labels is None:
      labels = np.asarray(jax.random.randint(label_key, (total,), 0, model.num_classes))
    labels = np.asarray(labels, np.int32)
    if labels.shape[0] < num_samples:
      raise ValueError(f"need {num_samples} labels, got {labels.shape[0]}")
    labels = np.resize(labels, total)  # pad the last batch (dropped below)
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
      lbl = jax.device_put(labels[b * batch_size:(b + 1) * batch_size], data_sharding)
    x = one_batch(params, b, lbl)
    out.append(np.asarray(multihost_utils.process_allgather(x, tiled=True)))
  samples = np.concatenate(out)[:num_samples]
  return samples, (labels[:num_samples] if conditional else None)


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
  if getattr(model, "num_classes", 0) and labels is None:
    labels = denoiser.null_labels(model, data.shape[0])
  if not getattr(model, "num_classes", 0):
    labels = None
  f = denoiser.make_denoise_fn(model, params, schedule,
                               labels=None if labels is None else jnp.asarray(labels))
  return jax.jit(lambda x: solvers.estimate_x_var_table(
      f, x, jax.random.PRNGKey(seed), schedule, num_points=num_points, eta=eta))(
          jnp.asarray(data))


def to_uint8(samples: np.ndarray) -> np.ndarray:
  """[-1, 1] floats -> uint8 images (round to nearest, clip)."""
  return np.clip(np.round((np.asarray(samples) + 1.0) * 127.5), 0, 255).astype(np.uint8)


def image_grid(images: np.ndarray) -> np.ndarray:
  """[N, H, W, C] in [-1, 1] -> one uint8 [rows*H, cols*W, C] grid, as square as fits."""
  images = to_uint8(images)
  n, h, w, c = images.shape
  cols = int(np.ceil(np.sqrt(n)))
  rows = int(np.ceil(n / cols))
  grid = np.zeros((rows * h, cols * w, c), np.uint8)
  for i, img in enumerate(images):
    r, q = divmod(i, cols)
    grid[r * h:(r + 1) * h, q * w:(q + 1) * w] = img
  return grid


def save_png(grid: np.ndarray, path: str):
  """Writes a uint8 grid as PNG; `path` may be local or on GCS."""
  from etils import epath  # pylint: disable=g-import-not-at-top
  from PIL import Image  # pylint: disable=g-import-not-at-top
  with epath.Path(path).open("wb") as fh:
    Image.fromarray(grid[..., 0] if grid.shape[-1] == 1 else grid).save(fh, format="PNG")


# --- what the sample CLI asks for ----------------------------------------------------------


def sampler_spec(run, steps: int, sampler: str | None, x_var: str, guidance: float):
  """The SamplerSpec for a run and the command line; ValueError on a mismatch."""
  if run.student_steps is not None:
    counts = run.step_counts
    if len(counts) > 1 and steps not in counts:
      raise ValueError(f"{run.workdir} is an any-step Multistep CM for {counts} steps; pass "
                       f"--steps with one of them")
    if len(counts) == 1 and steps and steps != counts[0]:
      raise ValueError(f"{run.workdir} is a {counts[0]}-step Multistep CM; --steps="
                       f"{steps} does not match it (omit --steps)")
    if sampler:
      raise ValueError("--sampler applies to diffusion runs; a Multistep CM samples with DDIM "
                       "between its segment boundaries (Algorithm 2)")
    s = steps or counts[0]
    return SamplerSpec("mcm", s, guidance=guidance, boundaries=run.boundaries(s),
                       step_index=counts.index(s))
  return SamplerSpec(sampler or run.config.sample_sampler,
                                steps or int(run.config.sample_steps), x_var, guidance)


def parse_labels(text: str, num: int, num_classes: int):
  if not num_classes or text == "random":
    return None
  ids = [int(v) for v in text.split(",") if v.strip()]
  bad = [i for i in ids if not 0 <= i < num_classes]
  if not ids or bad:
    raise ValueError(f"--labels must be 'random' or class ids in [0, {num_classes}), got "
                     f"{text!r}")
  return np.resize(np.asarray(ids, np.int32), num)


def table_data(run, num_examples: int, seed: int):
  """Training examples (and labels) for the aDDIM x_var table."""
  from multistep_cm import train  # pylint: disable=g-import-not-at-top
  source = train.make_source(run.config)
  rng = np.random.default_rng(seed)
  idx = np.sort(rng.choice(len(source), min(num_examples, len(source)), replace=False))
  batch = source.get(idx)
  return batch[train.data_key(batch)], batch.get("label")
