"""Samplers: diffusion sampling with DDIM, aDDIM, Euler or Heun, and Multistep CM sampling
(docs/maths.md §4, §5.3; Euler, Heun and the Karras grid: §16).

Each sampler is one `jax.lax.fori_loop` over a descending time grid, so a K-step
sampler compiles to one program whose cost is K network evaluations (Heun: 2K - 1).
`denoise_fn(z, t)` returns x̂ with `t` of shape `[B]`.

Euler and Heun are EDM's samplers (Karras et al. 2022, Algorithm 1) in its coordinates
`sigma = sigma_t / alpha_t = exp(-logSNR / 2)`, `x = z_t / alpha_t`, on the
probability-flow ODE `dx/dsigma = (x - x̂) / sigma`. An Euler step there is exactly a
DDIM step (tests/unit/test_samplers.py), so Heun is DDIM plus EDM's second-order correction.
"""
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np

from multistep_cm.diffusion import schedules as schedules_lib
from multistep_cm.diffusion import solvers

Schedule = schedules_lib.Schedule
SAMPLERS = ("ddim", "addim", "euler", "heun")
SPACINGS = ("uniform", "karras")
FINAL_STEPS = ("addim", "ddim")
# aDDIM's last step to t = 0 (`final_step`). The aDDIM step to t = 0 has c(t, 0) = 1, so
# it adds `sqrt(x_var / mean(eps^2)) eps` of isotropic noise to the finished sample.
# Measured (docs/results.md, "Diffusion samplers at equal NFE"): on the digits that noise lands
# on pixels every digit has at -1 and makes aDDIM worse than DDIM at 2-8 steps; with a
# DDIM last step (which returns x̂) aDDIM matches DDIM there (within 0.4 FD). On the 8-d
# toy mixture, whose modes really are that wide, the aDDIM last step is better (ED 0.0048
# vs 0.0068 at 8 steps), but the DDIM last step still beats plain DDIM. DDIM is the
# default because it never lost to DDIM by more than noise on either, while the aDDIM
# last step lost badly on the digits; "addim" is Algorithm 3 as written.
DEFAULT_FINAL_STEP = "ddim"
KARRAS_RHO = 7.0  # EDM's rho (Karras et al. 2022, eq. 5)


def uniform_grid(num_steps: int):
  """Times `1, (K-1)/K, ..., 1/K, 0` (descending, K + 1 points)."""
  if num_steps < 1:
    raise ValueError(f"num_steps must be >= 1, got {num_steps}")
  return jnp.linspace(1.0, 0.0, num_steps + 1, dtype=jnp.float32)


def edm_sigma(schedule: Schedule, t):
  """EDM's `sigma = sigma_t / alpha_t = exp(-logSNR(t) / 2)`; exactly 0 at t = 0 (the data)."""
  alpha, sigma = solvers.alpha_sigma(schedule, t)
  return sigma / alpha


def karras_grid(num_steps: int, schedule: Schedule, rho: float = KARRAS_RHO):
  """EDM's time steps (eq. 5) mapped to t: K + 1 descending times from 1 to 0.

  `sigma_i = (sigma_max^(1/rho) + i/K (sigma_min^(1/rho) - sigma_max^(1/rho)))^rho` for
  i = 0..K, with sigma_max and sigma_min the schedule's own at t = 1 and t = 0, and
  `t_i = t(logSNR = -2 log sigma_i)` through the schedule's inverse. That is EDM's eq. 5
  with K + 1 levels and sigma_min replaced by 0: the last time is the schedule's t = 0,
  which the solvers treat as the data (sigma = 0). So Heun's last step is a first-order
  step from sigma_{K-1} to 0, whereas EDM's `num_steps=K` grid has K levels and a last
  step from sigma_min to 0 (§16.3).
  """
  if num_steps < 1:
    raise ValueError(f"num_steps must be >= 1, got {num_steps}")
  with jax.ensure_compile_time_eval():  # a constant of the schedule, also under jit
    lam_min, lam_max = (float(schedule.logsnr(t)) for t in (1.0, 0.0))
    i = np.arange(num_steps + 1, dtype=np.float64) / num_steps
    # sigma^(1/rho) = exp(-logSNR / (2 rho)), computed in float64 as EDM does.
    root_max, root_min = np.exp(-lam_min / (2 * rho)), np.exp(-lam_max / (2 * rho))
    logsnr = -2.0 * rho * np.log(root_max + i * (root_min - root_max))
    times = np.asarray(schedule.t_from_logsnr(jnp.asarray(logsnr, jnp.float32)), np.float64)
  times[0], times[-1] = 1.0, 0.0
  return jnp.asarray(times, jnp.float32)


def time_grid(num_steps: int, schedule: Schedule, spacing: str = "uniform"):
  """The K + 1 descending times of a K-step sampler: uniform in t, or EDM's (Karras) spacing."""
  if spacing == "uniform":
    return uniform_grid(num_steps)
  if spacing == "karras":
    return karras_grid(num_steps, schedule)
  raise ValueError(f"spacing must be one of {SPACINGS}, got {spacing!r}")


def nfe(sampler: str, num_steps: int) -> int:
  """Network evaluations of `num_steps` steps: Heun skips its correction on the last step."""
  return 2 * num_steps - 1 if sampler == "heun" else num_steps


def sample_on_grid(denoise_fn: Callable, z, schedule: Schedule, times, sampler: str = "ddim",
                   x_var=None, pass_next_time: bool = False, final_step: str | None = None):
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
    final_step: for aDDIM, the solver of the last step: "addim", or "ddim" (returns x̂
      at t = 0). None: the sampler's own on every step (teacher solves; `sample` applies
      `DEFAULT_FINAL_STEP` instead).

  Returns:
    The latent at `times[-1]`; at t = 0 that is the sample.
  """
  if sampler not in ("ddim", "addim"):
    raise ValueError(f"sample_on_grid takes 'ddim' or 'addim', got {sampler!r}")
  last = _final_step(sampler, final_step, default=sampler)
  times = jnp.asarray(times, jnp.float32)
  batch = z.shape[0]

  def x_var_at(t):
    if x_var is None:
      return solvers.analytic_x_var(t, schedule)
    if callable(x_var):
      return x_var(t)
    return jnp.asarray(x_var, jnp.float32)

  def step(i, z, solver):
    t, s = times[i], times[i + 1]
    if pass_next_time:
      x_hat = denoise_fn(z, jnp.full((batch,), t), jnp.full((batch,), s))
    else:
      x_hat = denoise_fn(z, jnp.full((batch,), t))
    if solver == "ddim":
      return solvers.ddim(x_hat, z, t, s, schedule)
    return solvers.addim(x_hat, z, t, s, schedule, x_var_at(t))

  num_steps = times.shape[0] - 1
  if last == sampler:
    return jax.lax.fori_loop(0, num_steps, lambda i, z: step(i, z, sampler), z)
  z = jax.lax.fori_loop(0, num_steps - 1, lambda i, z: step(i, z, sampler), z)
  return step(num_steps - 1, z, last)


def _final_step(sampler: str, final_step: str | None, default: str) -> str:
  if final_step is None:
    return default
  if sampler != "addim":
    raise ValueError(f"final_step applies to the aDDIM sampler only, not {sampler!r}")
  if final_step not in FINAL_STEPS:
    raise ValueError(f"final_step must be one of {FINAL_STEPS}, got {final_step!r}")
  return final_step


def sample_edm(denoise_fn: Callable, x, schedule: Schedule, times, second_order: bool):
  """EDM's Euler or Heun (Karras et al. 2022, Algorithm 1) on the grid `times` (ending at 0).

  Works in `x = z / alpha`, `sigma = exp(-logSNR / 2)`: the ODE is
  `dx/dsigma = d(x, sigma) = (x - D(x, sigma)) / sigma` with `D(x, sigma) = x̂(alpha_t x, t)`.
  Heun averages d at both ends of each step, except on the last (to sigma = 0, where d is
  undefined), so K steps cost 2K - 1 evaluations. Takes and returns `x`, not z.
  """
  times = jnp.asarray(times, jnp.float32)
  batch = x.shape[0]

  def slope(x, t):
    alpha, _ = solvers.alpha_sigma(schedule, t)
    return (x - denoise_fn(alpha * x, jnp.full((batch,), t))) / edm_sigma(schedule, t)

  def euler(i, x):
    t, s = times[i], times[i + 1]
    return x + (edm_sigma(schedule, s) - edm_sigma(schedule, t)) * slope(x, t)

  def heun(i, x):
    t, s = times[i], times[i + 1]
    h = edm_sigma(schedule, s) - edm_sigma(schedule, t)
    d = slope(x, t)
    x_euler = x + h * d
    return x + h * 0.5 * (d + slope(x_euler, s))

  num_steps = times.shape[0] - 1
  x = jax.lax.fori_loop(0, num_steps - 1, heun if second_order else euler, x)
  return euler(num_steps - 1, x)


def sample(denoise_fn: Callable, z, schedule: Schedule, num_steps: int, sampler: str = "ddim",
           x_var=None, spacing: str = "uniform", final_step: str | None = None):
  """Diffusion sampling in `num_steps` steps from t = 1 to t = 0; returns the sample.

  Args:
    denoise_fn: `denoise_fn(z, t) -> x̂`, t of shape `[B]`.
    z: N(0, I) noise, the latent at t = 1.
    schedule: the noise schedule.
    num_steps: K, the number of steps (network evaluations: `nfe(sampler, K)`).
    sampler: "ddim", "addim" (§5.3), "euler" or "heun" (EDM, §16).
    x_var: for aDDIM: None (the analytic rule 0.1 / (2 + SNR)), a callable `x_var(t)`
      (a table, Algorithm 3) or a constant.
    spacing: "uniform" in t, or "karras" (EDM's sigma spacing, rho = 7; `karras_grid`).
    final_step: aDDIM's last step: "ddim" (default, returns x̂; see `DEFAULT_FINAL_STEP`)
      or "addim".
  """
  if sampler not in SAMPLERS:
    raise ValueError(f"sampler must be one of {SAMPLERS}, got {sampler!r}")
  times = time_grid(num_steps, schedule, spacing)
  if sampler in ("ddim", "addim"):
    last = _final_step(sampler, final_step, DEFAULT_FINAL_STEP if sampler == "addim" else None)
    return sample_on_grid(denoise_fn, z, schedule, times, sampler, x_var, final_step=last)
  _final_step(sampler, final_step, None)  # rejects a final step for Euler / Heun
  alpha_1, _ = solvers.alpha_sigma(schedule, times[0])
  return sample_edm(denoise_fn, z / alpha_1, schedule, times, sampler == "heun")


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


def guidance_off(guidance_scale) -> bool:
  """Whether `guidance_scale` is a Python or numpy number equal to 0 (no guided pair needed);
  an array, traced or per-example, always runs the pair."""
  return isinstance(guidance_scale, (int, float, np.number)) and guidance_scale == 0


def classifier_free_guidance(denoise_fn: Callable, labels, null, guidance_scale,
                             return_conditional: bool = False) -> Callable:
  """Guided `denoise_fn(z, t)` from a conditional `denoise_fn(z, t, labels)`.

  `x̂ = x̂_c + w (x̂_c - x̂_u)` (Ho & Salimans; w = 0 is no guidance). x̂, eps-hat
  and v-hat are affine in each other for fixed z_t, so guiding x̂ equals guiding
  eps or v. Conditional and unconditional halves run as one batch. `labels` is the
  conditioning (class ids [B], or any pytree with a leading batch axis, e.g. text
  embeddings); `null` is the unconditional input: a class id, or a pytree like
  `labels`. `guidance_scale` is one w, or one per example ([B], broadcast over the
  data axes: a student trained on a range of w and told it). With `return_conditional`,
  the guided function returns `(x̂_guided, x̂_c)`.
  """
  if isinstance(null, int):
    labels = jnp.asarray(labels, jnp.int32)
    null = jnp.full_like(labels, null)
  per_example = jnp.ndim(guidance_scale) > 0

  def guided(z, t):
    if guidance_off(guidance_scale):
      x_c = denoise_fn(z, t, labels)
      return (x_c, x_c) if return_conditional else x_c
    both = denoise_fn(jnp.concatenate([z, z]), jnp.concatenate([t, t]),
                      jax.tree.map(lambda c, u: jnp.concatenate([c, u]), labels, null))
    x_c, x_u = jnp.split(both, 2)
    w = guidance_scale
    if per_example:
      w = jnp.reshape(jnp.asarray(w, x_c.dtype), (-1,) + (1,) * (x_c.ndim - 1))
    x_g = x_c + w * (x_c - x_u)
    return (x_g, x_c) if return_conditional else x_g

  return guided
