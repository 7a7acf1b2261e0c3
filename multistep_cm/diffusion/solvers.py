"""One-step solvers between diffusion times: DDIM, inverse DDIM and aDDIM (docs/maths.md §2, §5).

All functions take arrays with a leading batch axis and any data shape after it;
`t` and `s` are scalars or `[B]` vectors with `t > s`; reductions run over all
non-batch axes, per example, never across the batch.

The endpoint t = 0 is the data itself. The logSNR-clipped schedules give
`alpha_0 ~ 1 - 1.5e-7`, `sigma_0 ~ 5.5e-4` at t = 0; the solvers replace them by
exactly (1, 0), so a step to s = 0 returns x̂ (Algorithm 2 returns
`f(z_{1/T}, 1/T)`, §4) and the MCM target of the first segment is exactly
the classic consistency target `f(z_s, s)` (§2, "for t_step = 0").
"""
import dataclasses
from typing import Callable

import jax
import jax.numpy as jnp

from multistep_cm.diffusion import schedules as schedules_lib

Schedule = schedules_lib.Schedule
# Floor on the per-example mean square of eps-hat in aDDIM; only matters for z_t == alpha_t x̂.
_EPS_MS_FLOOR = 1e-12


def data_axes(x) -> tuple[int, ...]:
  """All non-batch axes of `x`."""
  return tuple(range(1, x.ndim))


def batch_mean(v, x):
  """Mean of `v` over the data axes of `x`-shaped arrays, per example: `[B]`."""
  return jnp.mean(v, axis=data_axes(x))


def bcast(v, x):
  """A scalar or `[B]` vector shaped to broadcast against `x` of shape `[B, ...]`."""
  v = jnp.asarray(v, jnp.float32)
  if v.ndim == 0:
    return v
  return v.reshape(v.shape + (1,) * (x.ndim - v.ndim))


def alpha_sigma(schedule: Schedule, t):
  """`(alpha_t, sigma_t)` with the data endpoint: t <= 0 gives exactly (1, 0)."""
  t = jnp.asarray(t, jnp.float32)
  alpha, sigma = schedule.alpha_sigma(t)
  at_data = t <= 0.0
  return jnp.where(at_data, 1.0, alpha), jnp.where(at_data, 0.0, sigma)


def _coefficients(t, s, schedule, x):
  a_t, s_t = alpha_sigma(schedule, t)
  a_s, s_s = alpha_sigma(schedule, s)
  a_t, s_t, a_s, s_s = (bcast(v, x) for v in (a_t, s_t, a_s, s_s))
  # c(t, s) = alpha_s - alpha_t sigma_s / sigma_t: the weight of x in DDIM_{t->s} (eq. 4).
  # Written over one denominator so both products round once; it tends to 0 as s -> t.
  c = (a_s * s_t - a_t * s_s) / s_t
  return a_t, s_t, a_s, s_s, c


def ddim(x, z_t, t, s, schedule: Schedule):
  """DDIM_{t->s}(x, z_t) = alpha_s x + (sigma_s / sigma_t)(z_t - alpha_t x), eq. (4).

  s == t is the identity, also at t = 0 where the formula reads 0/0 (Algorithm 1,
  line 13 with n_rel = 1 in the first segment); the guard keeps gradients finite.
  """
  a_t, s_t, a_s, s_s, _ = _coefficients(t, s, schedule, x)
  same = bcast(jnp.asarray(t) == jnp.asarray(s), x)
  ratio = jnp.where(same, 1.0, s_s / jnp.where(same, 1.0, s_t))
  return a_s * x + ratio * (z_t - a_t * x)


def inverse_ddim(z_s, z_t, t, s, schedule: Schedule):
  """The x for which DDIM_{t->s}(x, z_t) = z_s, eq. (5). Needs s < t (c(t, s) != 0)."""
  _, s_t, _, s_s, c = _coefficients(t, s, schedule, z_t)
  return (z_s - (s_s / s_t) * z_t) / c


def addim(x, z_t, t, s, schedule: Schedule, x_var):
  """Adjusted DDIM, eq. (14) and Algorithm 3 (§5).

  `z_s = alpha_s x + sqrt(sigma_s^2 + c(t,s)^2 x_var / mean(eps^2)) eps`, with
  `eps = (z_t - alpha_t x) / sigma_t` and `c(t,s)^2 x_var` the per-dimension
  variance of z_s given z_t (eq. 13). `mean(eps^2)` is `||eps||^2 / d` of each
  example on its own. With x_var = 0 this is DDIM.

  Args:
    x: the prediction x̂ of E[x | z_t], `[B, ...]`.
    z_t: the current latent.
    t, s: scalars or `[B]`, t > s.
    schedule: the noise schedule.
    x_var: scalar or `[B]`, the per-dimension variance of x given z_t
      (`tr Var[x | z_t] / d`).
  """
  a_t, s_t, a_s, s_s, c = _coefficients(t, s, schedule, x)
  eps = (z_t - a_t * x) / s_t
  eps_ms = jnp.maximum(batch_mean(jnp.square(eps), x), _EPS_MS_FLOOR)
  zs_var = jnp.square(c) * bcast(x_var, x)
  scale = jnp.sqrt(jnp.square(s_s) + zs_var / bcast(eps_ms, x))
  return a_s * x + scale * eps


# --- x_var rules (§5.3, §5.4) ---------------------------------------------------------------


def analytic_x_var(t, schedule: Schedule):
  """`0.1 / (2 + SNR(t))`: 10% of the posterior variance of a N(0, 0.5) prior (§5.4)."""
  a_t, s_t = alpha_sigma(schedule, t)
  return 0.1 / (2.0 + jnp.square(a_t) / jnp.maximum(jnp.square(s_t), 1e-30))


def training_x_var(x_teacher, x, eta: float = 0.75):
  """`eta * ||x_teacher - x||^2 / d` per example: the teacher step of Algorithm 1 (§5.5)."""
  return eta * batch_mean(jnp.square(x_teacher - x), x)


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class XVarTable:
  """A per-t table of x_var for sampling a diffusion model with aDDIM (Algorithm 3).

  Calling it interpolates linearly in t between the grid points `ts` (ascending).
  A pytree, so it can be passed into jitted samplers as data.
  """
  ts: jax.Array
  values: jax.Array

  def __call__(self, t):
    return jnp.interp(jnp.asarray(t, jnp.float32), self.ts, self.values)


def estimate_x_var_table(denoise_fn: Callable, x, key, schedule: Schedule,
                         num_points: int = 64, eta: float = 0.75) -> XVarTable:
  """Estimates `x_var(t) = eta * E||x - x̂(z_t)||^2 / d` on a grid of t from data `x`.

  Algorithm 3's precomputation: at sampling time x is unknown, so the average
  over a data batch per t stands in for it (§5.4).

  Args:
    denoise_fn: `denoise_fn(z, t) -> x̂` with t of shape `[B]`.
    x: a batch of data `[B, ...]`.
    key: PRNG key for the noise.
    schedule: the noise schedule.
    num_points: grid points in (0, 1].
    eta: the fraction `xvar_frac` (paper: 0.75).
  """
  ts = jnp.linspace(1.0 / num_points, 1.0, num_points)
  keys = jax.random.split(key, num_points)

  def one(t, k):
    eps = jax.random.normal(k, x.shape, x.dtype)
    a, s = alpha_sigma(schedule, t)
    x_hat = denoise_fn(a * x + s * eps, jnp.full((x.shape[0],), t))
    return eta * jnp.mean(jnp.square(x - x_hat))

  values = jax.lax.map(lambda a: one(*a), (ts, keys))
  # At t = 0 the data is known exactly.
  return XVarTable(ts=jnp.concatenate([jnp.zeros((1,)), ts]),
                   values=jnp.concatenate([jnp.zeros((1,)), values]))
