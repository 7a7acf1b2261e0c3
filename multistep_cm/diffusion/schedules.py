"""Variance-preserving noise schedules in logSNR form (docs/maths.md §1.1, §1.2).

`z_t = alpha_t x + sigma_t eps` with `alpha_t^2 = sigmoid(logsnr(t))` and
`sigma_t^2 = sigmoid(-logsnr(t))`, t in [0, 1], t = 1 the noise end.

The simple-diffusion formulas follow the reimplementation consensus recorded in
§1.2: the ±15 clip is applied to the *unshifted* cosine by mapping t
into [t_min, t_max] (so a shifted schedule spans [-15 + shift, 15 + shift]),
and the interpolated schedule is `t * shifted(low) + (1 - t) * shifted(high)`,
i.e. noisier (low-resolution shift) near t = 1 and the full-resolution schedule
near t = 0.

The schedules of other models' teachers (§17) sit beside them: `EDM` (EDM's sigma range
with its rho spacing), `DDPMLinear` (DDPM's and DiT's discrete linear beta) and
`FlowMatching` (rectified flow with SD3's shift). They are not config schedule names (yet):
build them with `edm()`, `ddpm_linear()` and `flow_matching()`.

Schedules are frozen dataclasses: hashable, so they can be static arguments of
`jax.jit`, and they close over nothing but floats.
"""
import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
import numpy as np


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


# --- the schedules of other models' teachers (docs/maths.md §17) ---------------------------------


@dataclasses.dataclass(frozen=True)
class EDM(Schedule):
  """EDM's noise levels as a schedule (§17.1): `sigma_ve(t) = (a + t (b - a))^rho` with
  `a = sigma_min^(1/rho)`, `b = sigma_max^(1/rho)`, and `logsnr = -2 log sigma_ve`.

  t = 0 is sigma_min (0.002, logSNR 12.43; the solvers treat t = 0 as the data itself) and
  t = 1 is sigma_max (80, logSNR -8.76). The map is EDM's time discretisation (Karras et al.
  2022, eq. 5), so K uniform steps in t are EDM's K + 1 levels with the last, sigma_min,
  replaced by 0: the grid `sampling.karras_grid` builds (§16.3).
  """
  sigma_min: float = 0.002
  sigma_max: float = 80.0
  rho: float = 7.0

  def __post_init__(self):
    if not 0.0 < self.sigma_min < self.sigma_max:
      raise ValueError(f"EDM schedule needs 0 < sigma_min < sigma_max, got {self.sigma_min} "
                       f"and {self.sigma_max}")
    if not self.rho > 0.0:
      raise ValueError(f"EDM schedule needs rho > 0, got {self.rho}")

  def _roots(self):
    return self.sigma_min ** (1.0 / self.rho), self.sigma_max ** (1.0 / self.rho)

  def logsnr(self, t):
    a, b = self._roots()
    return -2.0 * self.rho * jnp.log(a + jnp.asarray(t, jnp.float32) * (b - a))

  def t_from_logsnr(self, logsnr):
    """Closed form: `t = (exp(-logsnr / (2 rho)) - a) / (b - a)`, clipped to [0, 1]."""
    a, b = self._roots()
    root = jnp.exp(-jnp.asarray(logsnr, jnp.float32) / (2.0 * self.rho))
    return jnp.clip((root - a) / (b - a), 0.0, 1.0)


@functools.lru_cache(maxsize=16)
def _ddpm_log_alpha_bar(beta_start: float, beta_end: float, num_steps: int):
  """`log alpha_bar_n = sum_{j <= n} log(1 - beta_j)`, n = 0..N-1, in float64 (DDPM's
  `alphas_cumprod = cumprod(1 - linspace(beta_start, beta_end, N))`)."""
  betas = np.linspace(beta_start, beta_end, num_steps, dtype=np.float64)
  log_ab = np.cumsum(np.log1p(-betas))
  log_ab.setflags(write=False)
  return log_ab


@dataclasses.dataclass(frozen=True)
class DDPMLinear(Schedule):
  """DDPM's discrete linear-beta schedule (DiT's; §17.3), interpolated for continuous time.

  `beta_n = linspace(beta_start, beta_end, N)[n]` and `alpha_bar_n = prod_{j <= n} (1 - beta_j)`
  for the teacher's steps n = 0..N-1; step n sits at t = n / (N - 1), so the teacher's own
  time is `n = (N - 1) t` (`time_scale = N - 1 = 999` in `teachers.adapt`). Between the steps
  `log alpha_bar` is linear in t (a constant beta within each step), and
  `logsnr = log(alpha_bar / (1 - alpha_bar))`. The range is [-10.1, 9.21]: t = 0 is DDPM's
  first step (alpha_bar = 1 - 1e-4), which the solvers treat as the data itself, as for every
  schedule here.
  """
  beta_start: float = 1e-4
  beta_end: float = 0.02
  num_steps: int = 1000

  def __post_init__(self):
    if not 0.0 < self.beta_start <= self.beta_end < 1.0:
      raise ValueError(f"DDPM schedule needs 0 < beta_start <= beta_end < 1, got "
                       f"{self.beta_start} and {self.beta_end}")
    if self.num_steps < 2:
      raise ValueError(f"DDPM schedule needs num_steps >= 2, got {self.num_steps}")

  def _knots(self):
    return jnp.asarray(_ddpm_log_alpha_bar(float(self.beta_start), float(self.beta_end),
                                           int(self.num_steps)), jnp.float32)

  def log_alpha_bar(self, t):
    """`log alpha_bar(t)`: the steps n = (N - 1) t exactly, linear in t between them."""
    log_ab = self._knots()
    pos = jnp.clip(jnp.asarray(t, jnp.float32), 0.0, 1.0) * (self.num_steps - 1)
    n = jnp.clip(jnp.floor(pos), 0, self.num_steps - 2).astype(jnp.int32)
    frac = pos - n.astype(jnp.float32)
    return log_ab[n] + frac * (log_ab[n + 1] - log_ab[n])

  def logsnr(self, t):
    log_ab = self.log_alpha_bar(t)
    # log(1 - alpha_bar) through expm1: alpha_bar is within 1e-4 of 1 at t = 0.
    return log_ab - jnp.log(-jnp.expm1(log_ab))

  def t_from_logsnr(self, logsnr):
    """The exact inverse of the piecewise-linear `log alpha_bar(t)`: `log alpha_bar =
    log sigmoid(logsnr)`, located between two steps and interpolated back onto t (clipped to
    [0, 1] beyond the first and last steps)."""
    log_ab = self._knots()
    target = jax.nn.log_sigmoid(jnp.asarray(logsnr, jnp.float32))
    # log alpha_bar decreases with n: the number of steps above the target is its segment.
    above = jnp.sum(log_ab[None, :] > jnp.reshape(target, (-1, 1)), axis=-1)
    n = jnp.reshape(jnp.clip(above - 1, 0, self.num_steps - 2), jnp.shape(target))
    lo, hi = log_ab[n], log_ab[n + 1]
    frac = jnp.clip((lo - target) / (lo - hi), 0.0, 1.0)
    return (n.astype(jnp.float32) + frac) / (self.num_steps - 1)


@dataclasses.dataclass(frozen=True)
class FlowMatching(Schedule):
  """Rectified flow / flow matching (`z = (1 - t') x + t' eps`) with SD3's shift (§17.2).

  The teacher's flow time t' has `logsnr = 2 log((1 - t') / t')`; SD3's shift
  `t' = s u / (1 + (s - 1) u)` of an unshifted time u is `logsnr = 2 log((1 - u) / u) - 2 log s`,
  the same family as simple diffusion's shifted cosine (§1.2). The ends t' = 0 and 1 have
  logSNR +-inf, so, as for the cosine, the clip acts on time: u runs linearly over [u_0, u_1]
  as t runs over [0, 1], with u_0, u_1 the times at which the *shifted* logSNR is logsnr_max
  and logsnr_min. The defaults are the frames' clip (`frames.LOGSNR_CLIP`, §17.4): t = 1 is
  the teacher's t' = 1 - 3.1e-7, and t and u differ by at most max(s, 1/s) 3.1e-7, so a uniform
  grid in t is the teacher's uniform grid in u (shifted as it shifts it) to float32 rounding.
  """
  shift: float = 1.0
  logsnr_min: float = -30.0
  logsnr_max: float = 30.0

  def __post_init__(self):
    if not self.shift > 0.0:
      raise ValueError(f"flow-matching schedule needs shift > 0, got {self.shift}")
    if not self.logsnr_min < self.logsnr_max:
      raise ValueError(f"flow-matching schedule needs logsnr_min < logsnr_max, got "
                       f"{self.logsnr_min} and {self.logsnr_max}")

  def _ends(self):
    """`(2 log s, u_0, 1 - u_1)`, in float64."""
    log_shift = 2.0 * math.log(self.shift)
    u_0 = 1.0 / (1.0 + math.exp(0.5 * (self.logsnr_max + log_shift)))
    one_minus_u_1 = 1.0 / (1.0 + math.exp(-0.5 * (self.logsnr_min + log_shift)))
    return log_shift, u_0, one_minus_u_1

  def logsnr(self, t):
    log_shift, u_0, one_minus_u_1 = self._ends()
    width = 1.0 - u_0 - one_minus_u_1
    t = jnp.asarray(t, jnp.float32)
    # u and 1 - u each from its own end, so the one near 0 keeps its relative precision.
    u = u_0 + t * width
    one_minus_u = one_minus_u_1 + (1.0 - t) * width
    return 2.0 * (jnp.log(one_minus_u) - jnp.log(u)) - log_shift

  def t_from_logsnr(self, logsnr):
    """Closed form: `u = sigmoid(-(logsnr + 2 log s) / 2)`, `t = (u - u_0) / (u_1 - u_0)`."""
    log_shift, u_0, one_minus_u_1 = self._ends()
    u = jax.nn.sigmoid(-0.5 * (jnp.asarray(logsnr, jnp.float32) + log_shift))
    return jnp.clip((u - u_0) / (1.0 - u_0 - one_minus_u_1), 0.0, 1.0)


def edm(sigma_min: float = 0.002, sigma_max: float = 80.0, rho: float = 7.0) -> EDM:
  return EDM(sigma_min=float(sigma_min), sigma_max=float(sigma_max), rho=float(rho))


def ddpm_linear(beta_start: float = 1e-4, beta_end: float = 0.02,
                num_steps: int = 1000) -> DDPMLinear:
  return DDPMLinear(beta_start=float(beta_start), beta_end=float(beta_end),
                    num_steps=int(num_steps))


def flow_matching(shift: float = 1.0, logsnr_min: float = -30.0,
                  logsnr_max: float = 30.0) -> FlowMatching:
  return FlowMatching(shift=float(shift), logsnr_min=float(logsnr_min),
                      logsnr_max=float(logsnr_max))


_BUILDERS = {
    "cosine": cosine,
    "shifted_cosine": shifted_cosine,
    "interpolated_cosine": interpolated_cosine,
    # Other codebases' teachers' schedules, in logSNR (§17): a student may train and sample
    # on them too.
    "edm": edm,
    "ddpm_linear": ddpm_linear,
    "flow_matching": flow_matching,
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
