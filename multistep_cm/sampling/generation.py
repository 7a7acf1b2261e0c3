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

from multistep_cm.config import sampler as sampler_lib
from multistep_cm.diffusion import sampling
from multistep_cm.diffusion import solvers
from multistep_cm.models import conditioning
from multistep_cm.models import denoiser
from multistep_cm.runtime import sharding

# How samples are drawn is a description of the run (config/sampler.py); these names
# are kept here for the samplers' callers.
SamplerSpec = sampler_lib.SamplerSpec
KINDS = sampler_lib.KINDS
X_VAR_RULES = sampler_lib.X_VAR_RULES


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
             progress: bool = False, decode=None):
  """Draws `num_samples` samples; returns `(samples float32 [-1, 1]-ish, labels or None)`.

  Args:
    model, params, schedule: the network, its (replicated) parameters and schedule.
    spec: the sampler.
    num_samples: how many.
    seed: noise and random labels come from it.
    batch_size: global batch per call (rounded up to a multiple of the device count).
    labels: for a class-conditional model: None (uniformly random classes), or an
      int array of `num_samples` class ids; for a text model (models/conditioning.py), the dict
      of `num_samples` prompts' `text_embedding` [N, L, D] and `text_mask` [N, L].
    x_var_table: aDDIM's per-t table when `spec.x_var == 'table'`.
    mesh: the devices to use, the batch split over all its axes (default: all devices).
    progress: show a progress bar.
    decode: `decode(x) -> images` applied to each gathered batch: a latent model's VAE
      decoder (data/latents.py `decoder`), so that the samples are pictures.
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
    x = np.asarray(multihost_utils.process_allgather(one_batch(params, b, lbl), tiled=True))
    if decode is not None:  # on this process's devices: the whole batch, every process
      x = np.asarray(decode(x))
    out.append(x)
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
