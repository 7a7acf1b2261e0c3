"""Any Gaussian-path teacher as our denoiser `x̂ = denoise(z, logsnr, labels)` (docs/maths.md §17).

A teacher is its own call, `apply_fn(z_teacher, time_teacher, labels) -> output`, plus what
its frame, target and time are:

* ours (UViT, v on logSNR): `frame="vp", prediction="v"`, called at logSNR;
* DiT (eps on DDPM's linear beta, steps 0-999): `frame="vp", prediction="eps",
  schedule=schedules.ddpm_linear(), time_scale=999`, called at n = 999 t;
* EDM / EDM2 (`D(x; sigma)`): `frame="ve", prediction="x"`, called at sigma_ve;
* SD3, Flux, Wan (rectified flow, velocity eps - x): `frame="flow", prediction="velocity"`,
  called at t_fm (`time_scale=1000` for a model that takes 0-1000);
* SiT (flow with t = 0 the noise, velocity x - eps): the same with `flip_time=True`, called
  at 1 - t_fm.

Here t_fm = sigmoid(-logsnr/2) (§17.2), sigma_ve = exp(-logsnr/2) (§17.1), and the VP
teacher's own t is `schedule.t_from_logsnr(logsnr)` (§17.3). A teacher's shift (SD3, Flux)
does not enter here: the network is told the true noise level of its input, t_fm. The shift
belongs to the schedule the student is trained and sampled on (`schedules.flow_matching`).

The result is our frame's x̂ (and epŝ, `adapt_x_eps`): DDIM, aDDIM, inverse DDIM and the
analytic x_var need nothing else (§2, §5). `on_schedule` gives the `f(z, t)` that
`diffusion.sampling` and `diffusion.losses` call.

Wrong combinations are refused when the adapter is built, with a one-line ValueError that
names the argument and what it allows. The singular ends of each frame are clipped at
`frames.LOGSNR_CLIP` (§17.4).
"""
import math
from typing import Callable

import jax.numpy as jnp

from multistep_cm.diffusion import frames
from multistep_cm.diffusion import schedules as schedules_lib

FRAMES = frames.FRAMES
PREDICTIONS = frames.PREDICTIONS
CARRIES = frames.CARRIES
# What each non-VP frame's teacher is called at, for the refusal of a schedule.
_OWN_TIME = {"ve": "sigma_ve = exp(-logsnr / 2)", "flow": "its flow time t = sigmoid(-logsnr / 2)"}


def _check(apply_fn, frame, prediction, time_scale, flip_time, schedule):
  """Refuses a wrong combination with one line naming the argument (§17)."""
  if not callable(apply_fn):
    raise ValueError(f"apply_fn must be callable as apply_fn(z, time, labels), got "
                     f"{type(apply_fn).__name__}")
  check_conventions(frame, prediction, time_scale, flip_time, schedule)


def check_conventions(frame: str, prediction: str, time_scale: float = 1.0,
                      flip_time: bool = False, schedule: schedules_lib.Schedule | None = None):
  """Raises a one-line ValueError naming the argument where the frame, prediction, time scale,
  time convention and schedule of a teacher do not go together (what `adapt` refuses)."""
  if frame not in FRAMES:
    raise ValueError(f"frame must be one of {FRAMES}, got {frame!r}")
  if prediction not in PREDICTIONS:
    raise ValueError(f"prediction must be one of {PREDICTIONS}, got {prediction!r}")
  if prediction not in CARRIES[frame]:
    raise ValueError(f"prediction {prediction!r} is not a target of a {frame!r} teacher; "
                     f"a {frame!r} teacher predicts one of {CARRIES[frame]}")
  if isinstance(time_scale, bool) or not isinstance(time_scale, (int, float)) or not (
      math.isfinite(time_scale) and time_scale > 0):
    raise ValueError(f"time_scale must be a finite number > 0, got {time_scale!r}")
  if not isinstance(flip_time, bool):
    raise ValueError(f"flip_time must be True or False, got {flip_time!r}")
  if flip_time and frame != "flow":
    raise ValueError(f"flip_time applies to 'flow' teachers only (SiT's t = 0 noise), not to a "
                     f"{frame!r} teacher")
  if schedule is not None and not isinstance(schedule, schedules_lib.Schedule):
    raise ValueError(f"schedule must be a diffusion.schedules.Schedule (the teacher's own VP "
                     f"schedule) or None, got {type(schedule).__name__}")
  if schedule is not None and frame != "vp":
    raise ValueError(f"schedule applies to 'vp' teachers only; a {frame!r} teacher is called "
                     f"at {_OWN_TIME[frame]}, so pass schedule=None")
  if schedule is None and frame == "vp" and time_scale != 1.0:
    raise ValueError(f"schedule is needed: a 'vp' teacher with time_scale={time_scale} is not "
                     f"called at logSNR; pass its own schedule (e.g. schedules.ddpm_linear()), "
                     f"or time_scale=1.0 for a teacher whose time is logSNR")


def teacher_inputs(z, logsnr, *, frame: str, time_scale: float = 1.0, flip_time: bool = False,
                   schedule: schedules_lib.Schedule | None = None):
  """`(z_teacher, time_teacher)`: what a teacher in `frame` is called with at our `(z, logsnr)`.

  `time_teacher` has shape `[B]`: `time_scale` times logSNR (VP, no schedule), the VP
  schedule's own t (§17.3), sigma_ve (VE, §17.1) or the flow time (flow, §17.2; SiT's
  `1 - t` with `flip_time`). logSNR is clipped first (§17.4).
  """
  z = jnp.asarray(z, jnp.float32)
  logsnr = frames.clip_logsnr(jnp.broadcast_to(jnp.asarray(logsnr, jnp.float32), z.shape[:1]))
  if frame == "vp":
    time = logsnr if schedule is None else schedule.t_from_logsnr(logsnr)
    z_teacher = z
  elif frame == "ve":
    z_teacher, time = frames.vp_to_ve(z, logsnr)
  else:
    z_teacher, time = frames.vp_to_flow(z, logsnr, flip_time)
  return z_teacher, time * jnp.float32(time_scale)


def adapt_x_eps(apply_fn: Callable, *, frame: str, prediction: str, time_scale: float = 1.0,
                flip_time: bool = False,
                schedule: schedules_lib.Schedule | None = None) -> Callable:
  """Like `adapt`, but `denoise(z, logsnr, labels)` returns our `(x̂, epŝ)` (for aDDIM's and
  x_var's use of epŝ; §5.2). epŝ of an x-predicting teacher divides by sigma, and x̂ of an
  eps-predicting one by alpha, at the clipped logSNR (§17.4)."""
  _check(apply_fn, frame, prediction, time_scale, flip_time, schedule)

  def denoise(z, logsnr, labels=None):
    z = jnp.asarray(z, jnp.float32)
    logsnr = frames.clip_logsnr(jnp.broadcast_to(jnp.asarray(logsnr, jnp.float32),
                                                 z.shape[:1]))
    z_teacher, time = teacher_inputs(z, logsnr, frame=frame, time_scale=time_scale,
                                     flip_time=flip_time, schedule=schedule)
    out = jnp.asarray(apply_fn(z_teacher, time, labels), jnp.float32)
    if out.shape != z.shape:
      raise ValueError(f"apply_fn must return the shape of its input {z.shape}, got {out.shape}")
    return frames.x_eps_from_prediction(prediction, out, z, logsnr, flip_time)

  return denoise


def adapt(apply_fn: Callable, *, frame: str, prediction: str, time_scale: float = 1.0,
          flip_time: bool = False,
          schedule: schedules_lib.Schedule | None = None) -> Callable:
  """A teacher's own call as our denoiser `denoise(z, logsnr, labels) -> x̂` (§17).

  Args:
    apply_fn: `apply_fn(z_teacher, time_teacher, labels) -> output`, the teacher's call in its
      own variables, with `time_teacher` of shape `[B]`.
    frame: "vp" (our z, §1.1), "ve" (EDM's `x_ve = z / alpha`, §17.1) or "flow"
      (`z_fm = z / (alpha + sigma)`, §17.2).
    prediction: what `output` is: "x", "eps", "v" (VP only) or "velocity" (flow only).
    time_scale: multiplies the time passed (DiT's steps 0-999, SD3's 0-1000).
    flip_time: SiT's convention (flow only): time 0 is the noise, the velocity is x - eps.
    schedule: the teacher's own VP schedule when its time is not logSNR (a DDPM-linear
      teacher is called at the t where its alpha_bar gives our logSNR, §17.3).

  Returns:
    `denoise(z, logsnr, labels=None) -> x̂` in our frame, `z` of shape `[B, ...]` and
    `logsnr` a scalar or `[B]`.
  """
  pair = adapt_x_eps(apply_fn, frame=frame, prediction=prediction, time_scale=time_scale,
                     flip_time=flip_time, schedule=schedule)

  def denoise(z, logsnr, labels=None):
    return pair(z, logsnr, labels)[0]

  return denoise


def on_schedule(denoise: Callable, schedule: schedules_lib.Schedule,
                labels=None) -> Callable:
  """`f(z, t, labels=labels) = denoise(z, schedule.logsnr(t), labels)`: an adapted teacher on
  the schedule our samplers and losses step along (`t` of shape `[B]`). The third argument
  makes it usable with `sampling.classifier_free_guidance`."""

  def f(z, t, lbl=labels):
    return denoise(z, schedule.logsnr(jnp.asarray(t, jnp.float32)), lbl)

  return f
