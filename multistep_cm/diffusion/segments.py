"""Segment boundaries of Multistep CMs: where each of the S student steps starts and ends.

The paper splits t in [0, 1] into S equal segments (docs/maths.md §3.1). Here the boundaries are a
choice, each a monotone map g of u = k / S:
  * "uniform": t_k = k / S (the paper);
  * "logsnr": equal steps in logSNR between logSNR(0) and logSNR(1);
  * "karras": the EDM spacing (Karras et al. 2022, rho = 7) of the VE noise level
    sigma = exp(-logSNR / 2), over EDM's range [0.002, 80] clipped to the schedule's
    (§12.1); the first and last boundaries stay at t = 0 and 1;
  * an explicit list of S + 1 times from 0 to 1.
Because each kind is a map of k / S, the boundaries of S are a subset of those of 2S
(nested grids), which any-step training relies on.

Training keeps the paper's teacher discretisation: teacher steps are 1/T apart in t,
and every boundary is snapped to that grid (`grid_bounds`), so segment k holds the
integer grid points `bounds[k] < t T <= bounds[k + 1]`. For uniform boundaries with
T = N_per_segment * S the snap is exact and reproduces §3.1.
"""
import math
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from multistep_cm.diffusion import schedules as schedules_lib

KINDS = ("uniform", "logsnr", "karras")
KARRAS_RHO = 7.0
KARRAS_SIGMA_MIN, KARRAS_SIGMA_MAX = 0.002, 80.0


def _logsnr_np(schedule: schedules_lib.Schedule, t) -> np.ndarray:
  return np.asarray(schedule.logsnr(jnp.asarray(t, jnp.float32)), np.float64)


def time_at_logsnr(schedule: schedules_lib.Schedule, logsnr) -> np.ndarray:
  """The t in [0, 1] with `schedule.logsnr(t) = logsnr` (logSNR decreases in t)."""
  grid = np.linspace(0.0, 1.0, 100_001)
  values = _logsnr_np(schedule, grid)
  # np.interp needs increasing x: logSNR falls with t, so interpolate on the reversed grid.
  return np.interp(np.asarray(logsnr, np.float64), values[::-1], grid[::-1])


def boundaries(kind: str | Sequence[float], student_steps: int,
               schedule: schedules_lib.Schedule) -> np.ndarray:
  """`[S + 1]` ascending times from 0 to 1 (float64).

  Args:
    kind: "uniform", "logsnr", "karras", or an explicit sequence of S + 1 times.
    student_steps: S.
    schedule: the noise schedule (for "logsnr" and "karras").
  """
  s = int(student_steps)
  if s < 1:
    raise ValueError(f"student_steps must be >= 1, got {s}")
  if not isinstance(kind, str):
    values = np.asarray(kind, np.float64)
    if (values.shape != (s + 1,) or values[0] != 0.0 or values[-1] != 1.0
        or np.any(np.diff(values) <= 0)):
      raise ValueError(f"explicit boundaries must be {s + 1} increasing times from 0 to 1, "
                       f"got {list(values)}")
    return values
  u = np.arange(s + 1, dtype=np.float64) / s
  if kind == "uniform":
    return u
  lam0, lam1 = _logsnr_np(schedule, [0.0, 1.0])
  if kind == "logsnr":
    lam = lam0 + u * (lam1 - lam0)
  elif kind == "karras":
    sigma_min = max(math.exp(-lam0 / 2), KARRAS_SIGMA_MIN)
    sigma_max = min(math.exp(-lam1 / 2), KARRAS_SIGMA_MAX)
    r = 1.0 / KARRAS_RHO
    sigma = (sigma_min ** r + u * (sigma_max ** r - sigma_min ** r)) ** KARRAS_RHO
    lam = -2.0 * np.log(sigma)
  else:
    raise ValueError(f"segment boundaries must be one of {KINDS} or a list, got {kind!r}")
  t = time_at_logsnr(schedule, lam)
  t[0], t[-1] = 0.0, 1.0
  return t


def grid_bounds(bounds, num_steps):
  """Boundaries snapped to the 1/T grid: int32 `[..., S + 1]`, strictly increasing, 0 to T.

  `bounds` is `[..., S + 1]` floats in [0, 1]; `num_steps` (T, traced is fine) must be
  at least S. Each boundary goes to the nearest grid point, then is pushed up or
  down as little as needed to leave every segment at least one step.
  """
  bounds = jnp.asarray(bounds, jnp.float32)
  t = jnp.asarray(num_steps, jnp.int32)
  s = bounds.shape[-1] - 1
  k = jnp.arange(s + 1, dtype=jnp.int32)
  snapped = jnp.round(bounds * t.astype(jnp.float32)).astype(jnp.int32)
  snapped = snapped.at[..., 0].set(0).at[..., -1].set(t)
  # At least one step per segment means bounds[k] - k is non-decreasing and lies in
  # [0, T - S]: a running maximum raises the squeezed ones, a cap lowers the top ones.
  rising = jax.lax.cummax(snapped - k, axis=snapped.ndim - 1)
  return jnp.minimum(rising, t - s) + k


def trained_boundaries(kind, student_steps: int, schedule: schedules_lib.Schedule,
                       num_steps: int) -> list[float]:
  """The boundaries a model trained on a T-step grid actually used: snapped, as times.

  Sampling with exactly these (rather than the unsnapped ones) keeps sampling and
  training consistent; checkpoints store them.
  """
  b = boundaries(kind, student_steps, schedule)
  return [float(v) / num_steps for v in np.asarray(grid_bounds(b, num_steps))]
