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
from multistep_cm.models import conditioning


def apply_x(model: nn.Module, params, z, t, schedule, labels=None, dropout_rng=None,
            segment=None, guidance=None):
  """x̂ from the network; `dropout_rng` switches on train mode (dropout).

  `segment` is the segment-layout input of any-step students, `guidance` the guidance
  scale w told to guidance-conditioned students (models/layers.py).
  """
  train = dropout_rng is not None
  kwargs = {} if segment is None else {"segment": segment}
  if guidance is not None:
    kwargs["guidance"] = guidance
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
                    guidance_scale=0.0, null_label: int | None = None,
                    return_conditional: bool = False, segment=None,
                    guidance_input=None) -> Callable:
  """`f(z, t) -> x̂` in eval mode, with classifier-free guidance when `guidance_scale` > 0
  (one w, or one per example `[B]`).

  `labels` is the model's conditioning (conditioning.py): class ids, or a text model's
  embeddings and mask; guidance's unconditional half is `conditioning.null_like` (or the
  class `null_label`). `return_conditional=True` makes it return `(x̂_guided, x̂_conditional)` (the CD
  teacher's x_var comes from the conditional output, §5.5). `segment` is passed to
  segment-conditioned students (a scalar or `[B]`); `guidance_input` is the w told to
  a guidance-conditioned student (a scalar or `[B]`; one forward, no guided pair).
  """
  guided = not sampling.guidance_off(guidance_scale)
  if guided and labels is None:
    raise ValueError("classifier-free guidance needs class labels or text")

  def cond_fn(z, t, lbl):
    seg = None if segment is None else jnp.broadcast_to(segment, z.shape[:1])
    w = None if guidance_input is None else jnp.broadcast_to(guidance_input, z.shape[:1])
    return apply_x(model, params, z, t, schedule, lbl, segment=seg, guidance=w)

  if guided:
    null = (conditioning.null_like(model, labels) if null_label is None
            else null_label)
    return sampling.classifier_free_guidance(cond_fn, labels, null, guidance_scale,
                                             return_conditional=return_conditional)

  def plain(z, t):
    x = cond_fn(z, t, labels)
    return (x, x) if return_conditional else x

  return plain


def null_labels(model: nn.Module, batch: int):
  """The unconditional input for `batch` examples: all-null labels for a class-conditional
  model, text with no tokens for a text model, else None."""
  if conditioning.is_text(model):
    return {"text_embedding": jnp.zeros((batch, model.text_len, model.text_dim), jnp.float32),
            "text_mask": jnp.zeros((batch, model.text_len), jnp.int32)}
  num_classes = getattr(model, "num_classes", 0)
  return jnp.full((batch,), num_classes, jnp.int32) if num_classes else None
