"""Samplers: diffusion sampling with DDIM or aDDIM, and Multistep CM sampling (spec §4, §5.3).

Each sampler is one `jax.lax.fori_loop` over a descending time grid, so a K-step
sampler compiles to one program whose cost is K network evaluations.
`denoise_fn(z, t)` returns x̂ with `t` of shape `[B]`.
"""
from typing import Callable

import jax
import jax.numpy as jnp

from multistep_cm.diffusion import schedules as schedules_lib
from multistep_cm.diffusion import solvers

Schedule = schedules_lib.Schedule
SAMPLERS = ("ddim", "addim")


def uniform_grid(num_steps: int):
  """Times `1, (K-1)/K, ..., 1/K, 0` (descending, K + 1 points)."""
  if num_steps < 1:
    raise ValueError(f"num_steps must be >= 1, got {num_steps}")
  return jnp.linspace(1.0, 0.0, num_steps + 1, dtype=jnp.float32)


def sample_on_grid(denoise_fn: Callable, z, schedule: Schedule, times, sampler: str = "ddim",
                   x_var=None, pass_next_time: bool = False):
  """Integrates from `times[0]` to `times[-1]` (descending) with DDIM or aDDIM steps.

  Args:
    denoise_fn: `denoise_fn(z, t) -> x̂`, t of shape `[B]`.
    z: the starting latent at `times[0]` (usually N(0, I) at t = 1).
    schedule: the noise schedule.
    times: descending 1-D array of times; `len(times) - 1` network evaluations.
    sampler: "ddim" or "addim".
    x_var: for aDDIM: None for the analytic rule 0.1 / (2 + SNR), a callable
      `x_var(t)` (e.g. `solvers.XVarTable`), or a constant.
    pass_next_time: call `denoise_fn(z, t, s)` with the step's target time s too
      (students conditioned on their segment start).

  Returns:
    The latent at `times[-1]`; at t = 0 that is the sample.
  """
  if sampler not in SAMPLERS:
    raise ValueError(f"sampler must be one of {SAMPLERS}, got {sampler!r}")
  times = jnp.asarray(times, jnp.float32)
  batch = z.shape[0]

  def x_var_at(t):
    if x_var is None:
      return solvers.analytic_x_var(t, schedule)
    if callable(x_var):
      return x_var(t)
    return jnp.asarray(x_var, jnp.float32)

  def body(i, z):
    t, s = times[i], times[i + 1]
    if pass_next_time:
      x_hat = denoise_fn(z, jnp.full((batch,), t), jnp.full((batch,), s))
    else:
      x_hat = denoise_fn(z, jnp.full((batch,), t))
    if sampler == "ddim":
      return solvers.ddim(x_hat, z, t, s, schedule)
    return solvers.addim(x_hat, z, t, s, schedule, x_var_at(t))

  return jax.lax.fori_loop(0, times.shape[0] - 1, body, z)


def sample(denoise_fn: Callable, z, schedule: Schedule, num_steps: int, sampler: str = "ddim",
           x_var=None):
  """Diffusion sampling in `num_steps` uniform steps from t = 1 to t = 0.

  With `sampler="addim"`, `x_var=None` uses the analytic rule and a callable
  `x_var(t)` a table (Algorithm 3). Returns the sample at t = 0.
  """
  return sample_on_grid(denoise_fn, z, schedule, uniform_grid(num_steps), sampler, x_var)


def sample_mcm(denoise_fn: Callable, z, schedule: Schedule, student_steps: int,
               boundaries=None, segment_aware: bool = False):
  """Algorithm 2: `student_steps` deterministic DDIM steps between segment boundaries.

  No aDDIM and no noise re-injection at sampling time for the student (§4).
  `boundaries` (S + 1 times, ascending or descending, from 0 to 1) default to the
  paper's equal segments; a model trained with other boundaries must sample with
  them (segments.py). `segment_aware` calls `denoise_fn(z, t, t_step)` with each
  segment's start, for students conditioned on it.
  """
  if boundaries is None:
    times = uniform_grid(student_steps)
  else:
    times = jnp.sort(jnp.asarray(boundaries, jnp.float32))[::-1]
    if times.shape[0] != student_steps + 1:
      raise ValueError(f"boundaries need student_steps + 1 = {student_steps + 1} points, got "
                       f"{times.shape[0]}")
  return sample_on_grid(denoise_fn, z, schedule, times, "ddim", pass_next_time=segment_aware)


def classifier_free_guidance(denoise_fn: Callable, labels, null_label: int,
                             guidance_scale: float, return_conditional: bool = False) -> Callable:
  """Guided `denoise_fn(z, t)` from a conditional `denoise_fn(z, t, labels)`.

  `x̂ = x̂_c + w (x̂_c - x̂_u)` (Ho & Salimans; w = 0 is no guidance). x̂, eps-hat
  and v-hat are affine in each other for fixed z_t, so guiding x̂ equals guiding
  eps or v. Conditional and unconditional halves run as one batch. With
  `return_conditional`, the guided function returns `(x̂_guided, x̂_c)`.
  """
  labels = jnp.asarray(labels, jnp.int32)

  def guided(z, t):
    if guidance_scale == 0:
      x_c = denoise_fn(z, t, labels)
      return (x_c, x_c) if return_conditional else x_c
    both = denoise_fn(jnp.concatenate([z, z]), jnp.concatenate([t, t]),
                      jnp.concatenate([labels, jnp.full_like(labels, null_label)]))
    x_c, x_u = jnp.split(both, 2)
    x_g = x_c + guidance_scale * (x_c - x_u)
    return (x_g, x_c) if return_conditional else x_g

  return guided
