"""Variance-preserving noise schedules in logSNR form (docs/maths.md §1.1, §1.2).

`z_t = alpha_t x + sigma_t eps` with `alpha_t^2 = sigmoid(logsnr(t))` and
`sigma_t^2 = sigmoid(-logsnr(t))`, t in [0, 1], t = 1 the noise end.

The simple-diffusion formulas follow the reimplementation consensus recorded in
§1.2: the ±15 clip is applied to the *unshifted* cosine by mapping t
into [t_min, t_max] (so a shifted schedule spans [-15 + shift, 15 + shift]),
and the interpolated schedule is `t * shifted(low) + (1 - t) * shifted(high)`,
i.e. noisier (low-resolution shift) near t = 1 and the full-resolution schedule
near t = 0.

Schedules are frozen dataclasses: hashable, so they can be static arguments of
`jax.jit`, and they close over nothing but floats.
"""
import dataclasses
import math

import jax
import jax.numpy as jnp


def _logsnr_cosine(t, logsnr_min: float, logsnr_max: float):
  t_min = math.atan(math.exp(-0.5 * logsnr_max))
  t_max = math.atan(math.exp(-0.5 * logsnr_min))
  return -2.0 * jnp.log(jnp.tan(t_min + t * (t_max - t_min)))


@dataclasses.dataclass(frozen=True)
class Schedule:
  """Base class: subclasses define `logsnr(t)`; everything else derives from it."""

  def logsnr(self, t):
    raise NotImplementedError

  def alpha_sigma(self, t):
    """Returns `(alpha_t, sigma_t)`, each with the shape of `t`."""
    logsnr = self.logsnr(jnp.asarray(t, jnp.float32))
    # sqrt(sigmoid(.)) is accurate at both ends in float32 (sigma_0 ~ 5.5e-4 at logSNR 15).
    return jnp.sqrt(jax.nn.sigmoid(logsnr)), jnp.sqrt(jax.nn.sigmoid(-logsnr))

  def snr(self, t):
    return jnp.exp(self.logsnr(jnp.asarray(t, jnp.float32)))

  def t_from_logsnr(self, logsnr):
    """The inverse of `logsnr(t)`, clipped to t in [0, 1]; logSNR decreases in t.

    Generic: bisection to float32 resolution. Schedules with a closed form override it.
    """
    logsnr = jnp.asarray(logsnr, jnp.float32)

    def halve(_, bounds):
      lo, hi = bounds
      mid = 0.5 * (lo + hi)
      above = self.logsnr(mid) > logsnr  # still on the data side of the target
      return jnp.where(above, mid, lo), jnp.where(above, hi, mid)

    lo, hi = jax.lax.fori_loop(0, 48, halve, (jnp.zeros_like(logsnr), jnp.ones_like(logsnr)))
    return 0.5 * (lo + hi)


@dataclasses.dataclass(frozen=True)
class Cosine(Schedule):
  """`logsnr(t) = -2 log tan(t_min + t (t_max - t_min))`, spanning [logsnr_min, logsnr_max]."""
  logsnr_min: float = -15.0
  logsnr_max: float = 15.0

  def __post_init__(self):
    if not self.logsnr_min < self.logsnr_max:
      raise ValueError(f"cosine schedule needs logsnr_min < logsnr_max, got "
                       f"{self.logsnr_min} and {self.logsnr_max}")

  def logsnr(self, t):
    return _logsnr_cosine(jnp.asarray(t, jnp.float32), self.logsnr_min, self.logsnr_max)

  def _logsnr_shift(self) -> float:
    return 0.0

  def t_from_logsnr(self, logsnr):
    """Closed form: `t = (atan(exp(-logsnr / 2)) - t_min) / (t_max - t_min)`."""
    t_min = math.atan(math.exp(-0.5 * self.logsnr_max))
    t_max = math.atan(math.exp(-0.5 * self.logsnr_min))
    unshifted = jnp.asarray(logsnr, jnp.float32) - self._logsnr_shift()
    return jnp.clip((jnp.arctan(jnp.exp(-0.5 * unshifted)) - t_min) / (t_max - t_min), 0.0, 1.0)


@dataclasses.dataclass(frozen=True)
class ShiftedCosine(Cosine):
  """Cosine shifted by `2 log(noise_d / image_d)`: the schedule of a `noise_d` image
  applied at resolution `image_d` (simple diffusion)."""
  image_d: float = 64.0
  noise_d: float = 64.0

  def _logsnr_shift(self) -> float:
    return 2.0 * math.log(self.noise_d / self.image_d)

  def logsnr(self, t):
    return super().logsnr(t) + self._logsnr_shift()


@dataclasses.dataclass(frozen=True)
class InterpolatedCosine(Cosine):
  """`t * shifted(noise_d_low) + (1 - t) * shifted(noise_d_high)` (simple diffusion).

  With noise_d_high = image_d this is `cosine(t) + 2 t log(noise_d_low / image_d)`:
  for ImageNet64 (32 -> 64) `cosine(t) - 2 t log 2` (§1.2).
  """
  image_d: float = 64.0
  noise_d_low: float = 32.0
  noise_d_high: float = 64.0

  def logsnr(self, t):
    t = jnp.asarray(t, jnp.float32)
    shift_low = 2.0 * math.log(self.noise_d_low / self.image_d)
    shift_high = 2.0 * math.log(self.noise_d_high / self.image_d)
    base = super().logsnr(t)
    return base + t * shift_low + (1.0 - t) * shift_high

  # The t-dependent shift has no closed-form inverse: back to the generic bisection.
  t_from_logsnr = Schedule.t_from_logsnr


def cosine(logsnr_min: float = -15.0, logsnr_max: float = 15.0) -> Cosine:
  return Cosine(logsnr_min=logsnr_min, logsnr_max=logsnr_max)


def shifted_cosine(image_d: float, noise_d: float, logsnr_min: float = -15.0,
                   logsnr_max: float = 15.0) -> ShiftedCosine:
  return ShiftedCosine(logsnr_min=logsnr_min, logsnr_max=logsnr_max,
                       image_d=float(image_d), noise_d=float(noise_d))


def interpolated_cosine(image_d: float, noise_d_low: float, noise_d_high: float | None = None,
                        logsnr_min: float = -15.0,
                        logsnr_max: float = 15.0) -> InterpolatedCosine:
  """`noise_d_high` defaults to `image_d` (the paper's 32 -> 64 and 32 -> 128 settings)."""
  return InterpolatedCosine(
      logsnr_min=logsnr_min, logsnr_max=logsnr_max, image_d=float(image_d),
      noise_d_low=float(noise_d_low),
      noise_d_high=float(image_d if noise_d_high is None else noise_d_high))


_BUILDERS = {
    "cosine": cosine,
    "shifted_cosine": shifted_cosine,
    "interpolated_cosine": interpolated_cosine,
}
NAMES = tuple(_BUILDERS)


def get_schedule(name: str, **kwargs) -> Schedule:
  """Builds a schedule from a config: `get_schedule("interpolated_cosine", image_d=64, ...)`."""
  if name not in _BUILDERS:
    raise ValueError(f"schedule name must be one of {NAMES}, got {name!r}")
  try:
    return _BUILDERS[name](**kwargs)
  except TypeError as e:
    raise ValueError(f"bad arguments {sorted(kwargs)} for schedule {name!r}: {e}") from None
