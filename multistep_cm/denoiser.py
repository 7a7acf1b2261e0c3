"""Glue between a v-predicting network and the diffusion maths' `f(z, t) -> x̂`.

The networks take `(z, logsnr, labels)` and predict v (models/); the maths takes
`x̂ = f(z_t, t)` (diffusion/). Everything that turns one into the other is here, so
the trainer, the samplers and the evaluators build denoisers the same way.
"""
from typing import Callable

import flax.linen as nn
import jax.numpy as jnp

from multistep_cm.diffusion import process
from multistep_cm.diffusion import sampling


def apply_x(model: nn.Module, params, z, t, schedule, labels=None, dropout_rng=None,
            segment=None):
  """x̂ from the network; `dropout_rng` switches on train mode (dropout).

  `segment` is the segment-layout input of any-step students (models/layers.py).
  """
  train = dropout_rng is not None
  kwargs = {} if segment is None else {"segment": segment}
  v = model.apply({"params": params}, z, schedule.logsnr(t), labels, train=train,
                  rngs={"dropout": dropout_rng} if train else None, **kwargs)
  return process.x_from_v(v, z, t, schedule)


def segment_input(model: nn.Module, schedule, t_step=None, step_index=None):
  """What a segment-conditioned student is told: its step-count index, or the logSNR of
  its segment start t_step (t_step = 0 is the data end, the schedule's largest logSNR)."""
  kind = getattr(model, "segment_cond", "none")
  if kind == "none":
    return None
  if kind == "steps":
    if step_index is None:
      raise ValueError("a student conditioned on the step count needs its step index")
    return jnp.asarray(step_index, jnp.int32)
  return schedule.logsnr(jnp.asarray(t_step, jnp.float32))


def make_denoise_fn(model: nn.Module, params, schedule, labels=None,
                    guidance_scale: float = 0.0, null_label: int | None = None,
                    return_conditional: bool = False, segment=None) -> Callable:
  """`f(z, t) -> x̂` in eval mode, with classifier-free guidance when `guidance_scale` > 0.

  `return_conditional=True` makes it return `(x̂_guided, x̂_conditional)` (the CD
  teacher's x_var comes from the conditional output, §5.5). `segment` is passed to
  segment-conditioned students (a scalar or `[B]`).
  """
  if guidance_scale and labels is None:
    raise ValueError("classifier-free guidance needs class labels")

  def cond_fn(z, t, lbl):
    seg = None if segment is None else jnp.broadcast_to(segment, z.shape[:1])
    return apply_x(model, params, z, t, schedule, lbl, segment=seg)

  if guidance_scale:
    null = model.num_classes if null_label is None else null_label
    return sampling.classifier_free_guidance(cond_fn, labels, null, guidance_scale,
                                             return_conditional=return_conditional)

  def plain(z, t):
    x = cond_fn(z, t, labels)
    return (x, x) if return_conditional else x

  return plain


def null_labels(model: nn.Module, batch: int):
  """All-null labels (the unconditional class) for a conditional model, else None."""
  num_classes = getattr(model, "num_classes", 0)
  return jnp.full((batch,), num_classes, jnp.int32) if num_classes else None
