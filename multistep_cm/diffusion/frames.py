"""Other models' frames and prediction targets, mapped onto ours (docs/maths.md §17).

Our frame (§1.1): `z = alpha x + sigma eps` with `alpha^2 + sigma^2 = 1`, indexed by the
logSNR `lam = log(alpha^2 / sigma^2)`, so `alpha^2 = sigmoid(lam)`, `sigma^2 = sigmoid(-lam)`.
The other frames are the same Gaussian path written in other variables:

* VE (EDM, §17.1): `x_ve = z / alpha = x + sigma_ve eps`, `sigma_ve = sigma / alpha = exp(-lam/2)`.
* Flow matching (rectified flow, SD3, Flux; §17.2): `z_fm = (1 - t) x + t eps` with
  `t = sigma / (alpha + sigma) = sigmoid(-lam / 2)` and `z_fm = z / (alpha + sigma)`; data at
  t = 0, velocity `u = dz_fm/dt = eps - x`. SiT's flipped convention (`flip_time=True`):
  `tau = 1 - t`, data at tau = 1, velocity `x - eps`.
* Another VP schedule (DDPM, §17.3): the same z; only the time that indexes it differs.

Prediction targets, each turned into our `(x̂, epŝ)` at `(z, lam)` (§17, table):
`"x"`, `"eps"`, `"v"` (`v = alpha eps - sigma x`, §1.3) and `"velocity"` (`eps - x`, or
`x - eps` flipped). They do not depend on the frame the teacher was called in, because every
frame's variables are fixed functions of `(z, lam)`.

Pure functions: arrays in, arrays out, float32. `z`-shaped arrays have a leading batch axis;
`lam`, `sigma_ve` and `t` are scalars or `[B]`.

Singular points (§17.4). Each frame divides by something that vanishes at one end of the
path: alpha (eps-prediction's `x̂ = (z - sigma epŝ) / alpha`, and `x_ve = z / alpha`) at
lam -> -inf, which is flow time t -> 1; sigma (x-prediction's `epŝ = (z - alpha x̂) / sigma`,
and `lam = -2 log sigma_ve`) at lam -> +inf, sigma_ve -> 0, t -> 0. Every conversion here
clips the logSNR to [-LOGSNR_CLIP, LOGSNR_CLIP] first (and the VE and flow times to the
same points, the constants below), so it never divides by less than ALPHA_MIN.
"""
import math

import jax
import jax.numpy as jnp

FRAMES = ("vp", "ve", "flow")
PREDICTIONS = ("x", "eps", "v", "velocity")
# The targets each frame's teachers predict (§17). A VE teacher has no flow velocity and no
# VP v; a flow teacher's velocity is its own, not our v.
CARRIES = {"vp": ("x", "eps", "v"), "ve": ("x", "eps"), "flow": ("x", "eps", "velocity")}

# --- the clips (§17.4) ---------------------------------------------------------------------------
# |logSNR| <= 30. Why 30: every schedule here lies well inside (the cosines reach -15 - 8 log 2
# ~ -20.5 at most, EDM's [0.002, 80] is [-8.8, 12.4], DDPM-linear [-10.1, 9.2]; the flow
# schedule's ends are put exactly at +-30), so the clip changes no value a schedule produces
# at t in (0, 1); and at 30 the smaller of alpha and sigma is exp(-15) ~ 3.1e-7, still ~5 float32
# ulps of 1 away from the flow time's ends, so t_fm and 1 - t_fm stay distinct from 0 and 1.
# Beyond it float32 fails outright (sigmoid(lam) underflows below lam ~ -87, sigma_ve^2
# overflows below lam ~ -88, the flow time rounds to 1 beyond lam ~ -35), and what is left to
# gain is nothing: at |lam| = 30 the divided quantity is already 3e6 times its float32 rounding.
LOGSNR_CLIP = 30.0
# alpha -> 0 (and sigma -> 0 at the other end): the smallest alpha or sigma divided by.
ALPHA_MIN = math.sqrt(1.0 / (1.0 + math.exp(LOGSNR_CLIP)))
SIGMA_MIN = ALPHA_MIN
# sigma_ve at 0 (the data end; lam = -2 log sigma_ve is +inf) and at infinity (alpha -> 0).
SIGMA_VE_MIN = math.exp(-LOGSNR_CLIP / 2)
SIGMA_VE_MAX = math.exp(LOGSNR_CLIP / 2)
# Flow time near 0 and near 1 (lam = 2 log((1 - t) / t) is +-inf at the ends). In float32
# FLOW_T_MAX rounds to 1 - 5 * 2^-24 ~ 1 - 3.0e-7.
FLOW_T_MIN = 1.0 / (1.0 + math.exp(LOGSNR_CLIP / 2))
FLOW_T_MAX = 1.0 - FLOW_T_MIN


def _f32(a):
  return jnp.asarray(a, jnp.float32)


def _bcast(v, x):
  """A scalar or `[B]` vector shaped to broadcast against `x` of shape `[B, ...]`."""
  v = _f32(v)
  if v.ndim == 0:
    return v
  return v.reshape(v.shape + (1,) * (x.ndim - v.ndim))


def clip_logsnr(logsnr):
  """`lam` clipped to [-LOGSNR_CLIP, LOGSNR_CLIP] (§17.4); +-inf become the clip's ends."""
  return jnp.clip(_f32(logsnr), -LOGSNR_CLIP, LOGSNR_CLIP)


def alpha_sigma(logsnr):
  """`(alpha, sigma)` of our frame at the clipped `lam`: `sqrt(sigmoid(+-lam))` (§1.1)."""
  lam = clip_logsnr(logsnr)
  return jnp.sqrt(jax.nn.sigmoid(lam)), jnp.sqrt(jax.nn.sigmoid(-lam))


# --- VE / EDM (§17.1) -----------------------------------------------------------------------------


def sigma_ve_from_logsnr(logsnr):
  """`sigma_ve = sigma / alpha = exp(-lam / 2)`, in [SIGMA_VE_MIN, SIGMA_VE_MAX]."""
  return jnp.exp(-0.5 * clip_logsnr(logsnr))


def logsnr_from_sigma_ve(sigma_ve):
  """`lam = -2 log sigma_ve`, sigma_ve clipped to [SIGMA_VE_MIN, SIGMA_VE_MAX] (0 is the data)."""
  return -2.0 * jnp.log(jnp.clip(_f32(sigma_ve), SIGMA_VE_MIN, SIGMA_VE_MAX))


def vp_to_ve(z, logsnr):
  """`(x_ve, sigma_ve)`: `x_ve = z / alpha`, `sigma_ve = exp(-lam / 2)`."""
  alpha, _ = alpha_sigma(logsnr)
  return _f32(z) / _bcast(alpha, z), sigma_ve_from_logsnr(logsnr)


def ve_to_vp(x_ve, sigma_ve):
  """`(z, lam)`: `lam = -2 log sigma_ve`, `z = alpha x_ve = x_ve / sqrt(1 + sigma_ve^2)`."""
  logsnr = logsnr_from_sigma_ve(sigma_ve)
  alpha, _ = alpha_sigma(logsnr)
  return _bcast(alpha, x_ve) * _f32(x_ve), logsnr


# --- flow matching (§17.2) ------------------------------------------------------------------------


def flow_time_from_logsnr(logsnr, flip_time: bool = False):
  """The flow time: `t = sigma / (alpha + sigma) = sigmoid(-lam / 2)` (data at t = 0), or SiT's
  `tau = 1 - t = sigmoid(lam / 2)` with `flip_time` (data at tau = 1). Each is computed as its
  own sigmoid, so the one near 0 keeps its relative precision."""
  lam = clip_logsnr(logsnr)
  return jax.nn.sigmoid(0.5 * lam if flip_time else -0.5 * lam)


def logsnr_from_flow_time(t, flip_time: bool = False):
  """`lam = 2 log((1 - t) / t)` (SiT's `2 log(tau / (1 - tau))` with `flip_time`), the time
  clipped to [FLOW_T_MIN, FLOW_T_MAX]. `1 - t` is exact in float32 for t >= 1/2."""
  t = jnp.clip(_f32(t), FLOW_T_MIN, FLOW_T_MAX)
  lam = 2.0 * (jnp.log1p(-t) - jnp.log(t))
  return clip_logsnr(-lam if flip_time else lam)


def vp_to_flow(z, logsnr, flip_time: bool = False):
  """`(z_fm, t)`: `z_fm = z / (alpha + sigma) = (1 - t) x + t eps` and the flow time."""
  alpha, sigma = alpha_sigma(logsnr)
  return _f32(z) / _bcast(alpha + sigma, z), flow_time_from_logsnr(logsnr, flip_time)


def flow_to_vp(z_fm, t, flip_time: bool = False):
  """`(z, lam)`: `lam = logsnr_from_flow_time(t)`, `z = (alpha + sigma) z_fm`."""
  logsnr = logsnr_from_flow_time(t, flip_time)
  alpha, sigma = alpha_sigma(logsnr)
  return _bcast(alpha + sigma, z_fm) * _f32(z_fm), logsnr


# --- prediction targets (§17, table) -------------------------------------------------------------


def _check_prediction(prediction: str):
  if prediction not in PREDICTIONS:
    raise ValueError(f"prediction must be one of {PREDICTIONS}, got {prediction!r}")


def x_eps_from_prediction(prediction: str, out, z, logsnr, flip_time: bool = False):
  """Our `(x̂, epŝ)` at `(z, lam)` from a network output `out` of kind `prediction`.

  * "x": `x̂ = out`, `epŝ = (z - alpha x̂) / sigma`;
  * "eps": `epŝ = out`, `x̂ = (z - sigma epŝ) / alpha`;
  * "v": `x̂ = alpha z - sigma v̂`, `epŝ = sigma z + alpha v̂` (§1.3);
  * "velocity" (`u = eps - x`; `x - eps` with `flip_time`): with `z_fm = z / (alpha + sigma)`
    and `t = sigma / (alpha + sigma)`, `x̂ = z_fm - t û`, `epŝ = z_fm + (1 - t) û`.

  The divisions of "x" and "eps" are by sigma and alpha at the clipped logSNR (§17.4);
  "v" and "velocity" divide by nothing that vanishes (`alpha + sigma >= 1`).
  """
  _check_prediction(prediction)
  z, out = _f32(z), _f32(out)
  alpha, sigma = (_bcast(c, z) for c in alpha_sigma(logsnr))
  if prediction == "x":
    return out, (z - alpha * out) / sigma
  if prediction == "eps":
    return (z - sigma * out) / alpha, out
  if prediction == "v":
    return alpha * z - sigma * out, sigma * z + alpha * out
  u = -out if flip_time else out
  norm = alpha + sigma
  return (z - sigma * u) / norm, (z + alpha * u) / norm


def prediction_from_x_eps(prediction: str, x, eps, logsnr, flip_time: bool = False):
  """The network output of kind `prediction` that `(x̂, epŝ)` at `lam` correspond to: x, eps,
  `v = alpha eps - sigma x`, or the velocity `eps - x` (`x - eps` with `flip_time`)."""
  _check_prediction(prediction)
  x, eps = _f32(x), _f32(eps)
  if prediction == "x":
    return x
  if prediction == "eps":
    return eps
  if prediction == "v":
    alpha, sigma = (_bcast(c, x) for c in alpha_sigma(logsnr))
    return alpha * eps - sigma * x
  return x - eps if flip_time else eps - x


def eps_from_x(x, z, logsnr):
  """`epŝ = (z - alpha x̂) / sigma`, sigma at the clipped logSNR."""
  return x_eps_from_prediction("x", x, z, logsnr)[1]


def convert_prediction(out, z, logsnr, source: str, target: str, flip_time: bool = False):
  """A network output of kind `source` at `(z, lam)` rewritten as kind `target`."""
  x, eps = x_eps_from_prediction(source, out, z, logsnr, flip_time)
  return prediction_from_x_eps(target, x, eps, logsnr, flip_time)
