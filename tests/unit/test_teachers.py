"""Teachers in other frames through `teachers.adapt`, against closed-form truth (§17).

The exact denoiser of the Gaussian mixture is written here in every teacher's own variables,
from the mixture's posterior given any Gaussian observation `y = a x + b eps` (`posterior`):
EDM's `D(x_ve; sigma_ve) = E[x | x + sigma_ve eps]`, a rectified flow's velocity
`E[eps - x | (1 - t) x + t eps]`, SiT's `E[x - eps | t x + (1 - t) eps]`, DiT's
`E[eps | z]` at its own step n (alpha_bar from DDPM's beta table, written here), and the VP x,
eps and v at logSNR. Through the adapter each must give the VP exact denoiser's x̂
(data/mixture.py) to float32 rounding, and so the same DDIM and aDDIM samples and the same
CD target. The frame and schedule maths is checked against float64 formulas, and DDIM on a
flow teacher against its Euler step written out.

Tolerances are float32 rounding times the conditioning of each conversion: `EPS32 (1 +
max|z_teacher|)`, times 1/alpha where an eps-prediction's x̂ = (z - sigma epŝ)/alpha
divides by alpha (§17.4).
"""
import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from multistep_cm import teachers
from multistep_cm.data import mixture as mixture_lib
from multistep_cm.diffusion import frames
from multistep_cm.diffusion import losses
from multistep_cm.diffusion import sampling
from multistep_cm.diffusion import schedules
from multistep_cm.diffusion import solvers

EPS32 = float(np.finfo(np.float32).eps)
MIX = mixture_lib.default_mixture(dim=8, seed=0)


# --- the exact mixture teacher in each frame, written from the posterior -----------------------


def posterior(z, a, b):
  """`(E[x | y], E[eps | y])` for `y = a x + b eps`, `a, b` of shape `[B]`, float32.

  Component k: `y ~ N(a mu_k, v_k I)`, `v_k = a^2 s_k^2 + b^2`; given y and k,
  `E[x] = mu_k + (a s_k^2 / v_k)(y - a mu_k)` and `E[eps] = (b / v_k)(y - a mu_k)` (Gaussian
  regression, so neither divides by a or b); responsibilities `r_k ~ pi_k N(y; a mu_k, v_k I)`.
  """
  mu = jnp.asarray(MIX.means, jnp.float32)
  s2 = jnp.square(jnp.asarray(MIX.stds, jnp.float32))
  a, b = jnp.asarray(a, jnp.float32)[:, None], jnp.asarray(b, jnp.float32)[:, None]
  v = a * a * s2[None] + b * b  # [B, K]
  diff = z[:, None, :] - a[:, :, None] * mu[None]  # [B, K, D]
  log_r = (jnp.log(jnp.asarray(MIX.weights, jnp.float32))[None]
           - 0.5 * jnp.sum(jnp.square(diff), -1) / v - 0.5 * MIX.dim * jnp.log(v))
  r = jax.nn.softmax(log_r, -1)
  mean_x = mu[None] + (a * s2[None] / v)[..., None] * diff
  mean_eps = (b / v)[..., None] * diff
  return jnp.einsum("bk,bkd->bd", r, mean_x), jnp.einsum("bk,bkd->bd", r, mean_eps)


def vp_teacher(prediction):
  """A VP teacher called at logSNR (ours): x, eps or `v = alpha eps - sigma x`."""
  def apply(z, logsnr, labels):
    del labels
    a, b = jnp.sqrt(jax.nn.sigmoid(logsnr)), jnp.sqrt(jax.nn.sigmoid(-logsnr))
    ex, ee = posterior(z, a, b)
    return {"x": ex, "eps": ee, "v": a[:, None] * ee - b[:, None] * ex}[prediction]
  return apply


def ve_teacher(prediction):
  """EDM: `D(x_ve; sigma) = E[x | x_ve]` with `x_ve = x + sigma eps`, or `E[eps | x_ve]`."""
  def apply(x_ve, sigma, labels):
    del labels
    ex, ee = posterior(x_ve, jnp.ones_like(sigma), sigma)
    return {"x": ex, "eps": ee}[prediction]
  return apply


def flow_teacher(prediction, time_scale=1.0, flip=False):
  """Rectified flow `z = (1 - t) x + t eps`, velocity `eps - x`; SiT (`flip`): `z = t x +
  (1 - t) eps`, velocity `x - eps`. Called at `time_scale * t`."""
  def apply(z, time, labels):
    del labels
    t = time / time_scale
    a, b = (t, 1.0 - t) if flip else (1.0 - t, t)
    ex, ee = posterior(z, a, b)
    velocity = ex - ee if flip else ee - ex
    return {"x": ex, "eps": ee, "velocity": velocity}[prediction]
  return apply


# DDPM's (DiT's) table: beta_n = linspace(1e-4, 0.02, 1000)[n],
# alpha_bar_n = prod_{j <= n} (1 - beta_j).
DDPM_ALPHA_BAR = np.cumprod(1.0 - np.linspace(1e-4, 0.02, 1000))


def ddpm_teacher(prediction="eps"):
  """DiT's eps (or x) at its own step n in [0, 999]: alpha_bar from its table, log-linear
  between the integer steps."""
  log_ab = jnp.asarray(np.log(DDPM_ALPHA_BAR), jnp.float32)

  def apply(z, n, labels):
    del labels
    k = jnp.clip(jnp.floor(n), 0, 998).astype(jnp.int32)
    la = log_ab[k] + (n - k) * (log_ab[k + 1] - log_ab[k])
    ex, ee = posterior(z, jnp.exp(0.5 * la), jnp.sqrt(-jnp.expm1(la)))
    return {"x": ex, "eps": ee}[prediction]
  return apply


COSINE = schedules.cosine()
DDPM = schedules.ddpm_linear()
# Each teacher with its adapter arguments and its own range, where its x̂ is checked.
# The eps-teachers called at logSNR use [-10, 10] (about DiT's range), where x̂ =
# (z - sigma epŝ)/alpha divides by alpha >= 6.7e-3; the cosine's -15 costs a digit more (§17.4).
CASES = {
    "vp-x": (vp_teacher("x"), dict(frame="vp", prediction="x"), COSINE),
    "vp-eps": (vp_teacher("eps"), dict(frame="vp", prediction="eps"), schedules.cosine(-10, 10)),
    "vp-v": (vp_teacher("v"), dict(frame="vp", prediction="v"), COSINE),
    "edm-x": (ve_teacher("x"), dict(frame="ve", prediction="x"), schedules.edm()),
    "edm-x-on-cosine": (ve_teacher("x"), dict(frame="ve", prediction="x"), COSINE),
    "ve-eps": (ve_teacher("eps"), dict(frame="ve", prediction="eps"), schedules.edm()),
    "flow-velocity-sd3": (flow_teacher("velocity", 1000.0),
                          dict(frame="flow", prediction="velocity", time_scale=1000.0),
                          schedules.flow_matching(shift=3.0)),
    "flow-velocity-sit": (flow_teacher("velocity", flip=True),
                          dict(frame="flow", prediction="velocity", flip_time=True),
                          schedules.flow_matching()),
    "flow-x": (flow_teacher("x"), dict(frame="flow", prediction="x"), schedules.flow_matching()),
    "flow-eps": (flow_teacher("eps"), dict(frame="flow", prediction="eps"),
                 schedules.flow_matching(logsnr_min=-10.0)),
    "ddpm-eps-dit": (ddpm_teacher("eps"),
                     dict(frame="vp", prediction="eps", schedule=DDPM, time_scale=999.0), DDPM),
    "ddpm-x": (ddpm_teacher("x"), dict(frame="vp", prediction="x", schedule=DDPM,
                                       time_scale=999.0), DDPM),
}
ENDS = jnp.array([-jnp.inf, -1e4, -30.0, 30.0, 1e4, jnp.inf])


def _exact(schedule):
  return lambda z, t: MIX.denoise(z, t, schedule)


def _draws(schedule, batch=256, seed=0):
  """z at t = 1/B .. 1 on `schedule`, from mixture data, and off it in a tenth of rows."""
  kx, ke = jax.random.split(jax.random.PRNGKey(seed))
  t = jnp.linspace(1.0 / batch, 1.0, batch)
  x = MIX.sample(kx, batch)[0]
  eps = jax.random.normal(ke, x.shape)
  x = x.at[::10].set(3.0 * jax.random.normal(kx, x[::10].shape))
  a, s = schedule.alpha_sigma(t)
  return t, a[:, None] * x + s[:, None] * eps


# The test programs are small and run once: XLA's backend optimisation buys nothing and costs
# half their compile time.
FAST_COMPILE = {"xla_backend_optimization_level": 0}


@pytest.fixture(scope="module")
def adapted_outputs():
  """`{case: (t, z, x̂, epŝ, x̂_exact, x̂ at ENDS, epŝ at ENDS)}`, all cases in one program."""
  draws = {case: _draws(schedule) for case, (_, _, schedule) in CASES.items()}
  z_ends = jax.random.normal(jax.random.PRNGKey(14), (ENDS.shape[0], MIX.dim))

  @functools.partial(jax.jit, compiler_options=FAST_COMPILE)
  def run(draws):
    out = {}
    for case, (apply_fn, kw, schedule) in CASES.items():
      t, z = draws[case]
      # The ends ride along as extra rows of the same call.
      x_hat, eps_hat = teachers.adapt_x_eps(apply_fn, **kw)(
          jnp.concatenate([z, z_ends]), jnp.concatenate([schedule.logsnr(t), ENDS]))
      b = z.shape[0]
      out[case] = (x_hat[:b], eps_hat[:b], MIX.denoise(z, t, schedule), x_hat[b:], eps_hat[b:])
    return out

  out = jax.device_get(run(draws))
  return {case: tuple(np.asarray(a) for a in draws[case] + out[case]) for case in CASES}


def _bound(case, z, logsnr):
  """`EPS32 (1 + max|z_teacher|)` per example, over alpha for an eps-prediction (§17.4)."""
  _, kw, _ = CASES[case]
  kw = {k: v for k, v in kw.items() if k != "prediction"}
  z_teacher, _ = teachers.teacher_inputs(z, logsnr, **kw)
  scale = EPS32 * (1.0 + np.max(np.abs(np.asarray(z_teacher)), -1))
  if CASES[case][1]["prediction"] == "eps":
    scale = scale / np.asarray(frames.alpha_sigma(logsnr)[0])
  return scale


@pytest.mark.parametrize("case", CASES)
def test_adapted_exact_teacher_is_the_vp_exact_denoiser(case, adapted_outputs):
  t, z, x_hat, eps_hat, want = adapted_outputs[case][:5]
  schedule = CASES[case][2]
  logsnr = schedule.logsnr(t)
  ratio = np.max(np.abs(x_hat - want), -1) / _bound(case, z, logsnr)
  # Observed: at most 3.1 (SiT), 1.2-2.2 for the others.
  assert ratio.max() < 8, (case, ratio.max())
  # epŝ is the exact E[eps | z]: x̂'s error times alpha / sigma (from epŝ = (z - alpha x̂)/sigma).
  a, s = schedule.alpha_sigma(t)
  _, eps_true = posterior(jnp.asarray(z), a, s)
  bound = 8 * _bound(case, z, logsnr) * np.maximum(np.asarray(a / s), 1.0)
  assert np.all(np.max(np.abs(eps_hat - np.asarray(eps_true)), -1) <= bound), case


@pytest.mark.parametrize("case", CASES)
def test_every_teacher_is_finite_at_and_beyond_the_ends(case, adapted_outputs):
  """logSNR -inf .. +inf, clipped at +-30 (§17.4): nothing divides by zero or overflows."""
  x_ends, eps_ends = adapted_outputs[case][5:]
  assert np.all(np.isfinite(x_ends)) and np.all(np.isfinite(eps_ends)), case


# The teachers of issue 25's list, sampled and distilled from (the other cases differ from
# these only in a prediction or a schedule the x̂ test above covers).
SAMPLED = ("vp-x", "vp-eps", "vp-v", "edm-x", "flow-velocity-sd3", "flow-velocity-sit",
           "ddpm-eps-dit")


@pytest.fixture(scope="module")
def sampled():
  """The SAMPLED teachers and the VP exact denoiser side by side, in one program, on DiT's
  schedule (its logSNR range [-10.1, 9.2] lies in every other teacher's): per case and for the
  exact denoiser, 8-step DDIM and aDDIM samples (aDDIM on every step, §5.3), and the CD
  target and loss with an aDDIM teacher step (Algorithm 1, §5.5)."""
  schedule = DDPM
  names = list(SAMPLED)
  fns = [teachers.on_schedule(teachers.adapt(CASES[name][0], **CASES[name][1]), schedule)
         for name in names] + [_exact(schedule)]
  n = 32
  blocks = len(fns)

  def teacher(z, t):  # block k of the batch goes to teacher k; everything here is per example
    return jnp.concatenate([f(z[k * n:(k + 1) * n], t[k * n:(k + 1) * n])
                            for k, f in enumerate(fns)])

  tile = lambda a: jnp.tile(a, (blocks,) + (1,) * (a.ndim - 1))
  z = tile(jax.random.normal(jax.random.PRNGKey(3), (n, MIX.dim)))
  x = tile(MIX.sample(jax.random.PRNGKey(4), n)[0])
  eps = tile(jax.random.normal(jax.random.PRNGKey(5), (n, MIX.dim)))
  grid = losses.make_grid(64, 4)  # S = 4 segments of 16 teacher steps
  segment, n_rel = (tile(a) for a in losses.sample_segments(jax.random.PRNGKey(6), n, grid))
  exact = _exact(schedule)

  @functools.partial(jax.jit, compiler_options=FAST_COMPILE)
  def run(z, x, eps):
    ddim = sampling.sample(teacher, z, schedule, 8, "ddim")
    addim = sampling.sample(teacher, z, schedule, 8, "addim", final_step="addim")
    loss, aux = losses.mcm_loss(lambda z, t, rng: exact(z, t), x, eps, segment, n_rel, None,
                                schedule=schedule, mode="cd", grid=grid, teacher_fn=teacher,
                                teacher_solver="addim")
    return ddim, addim, aux["x_target"], loss

  split = lambda a: np.split(np.asarray(a), blocks)
  ddim, addim, target, loss = (split(a) for a in run(z, x, eps))
  _, t, _ = losses.segment_times(segment[:n], n_rel[:n], grid)
  sigma = np.asarray(solvers.alpha_sigma(schedule, t)[1])
  return {name: {"ddim": (ddim[k], ddim[-1]), "addim": (addim[k], addim[-1]),
                 "target": (target[k], target[-1]), "loss": (loss[k], loss[-1]),
                 "sigma": sigma} for k, name in enumerate(names)}


@pytest.mark.parametrize("case", SAMPLED)
def test_same_ddim_and_addim_samples_and_cd_target(case, sampled):
  got = sampled[case]
  # x̂ agrees to ~1e-6 (eps teachers: ~4e-5 at DiT's logSNR -10.1, §17.4). Observed: samples
  # within 1e-6, CD targets within 7e-6 (inverse DDIM divides by c(t, t_step), §2.1).
  for key, tol in (("ddim", 1e-5), ("addim", 1e-5), ("target", 5e-5)):
    adapted, exact = got[key]
    np.testing.assert_allclose(adapted, exact, atol=tol, rtol=0, err_msg=f"{case} {key}")
  # The loss w(t) d(x_target - x̂) moves by at most w(t) = 1/sigma_t^2 times the target's RMS
  # change (d is 1-Lipschitz in the RMS, §3.6), plus its own rounding.
  (adapted, exact), (loss_a, loss_e) = got["target"], got["loss"]
  moved = np.sqrt(np.mean(np.square(adapted - exact), -1))
  assert np.all(np.abs(loss_a - loss_e) <= 1.01 * moved / np.square(got["sigma"])
                + 4 * EPS32 * np.abs(loss_e) + 1e-9), case


# --- a DDIM step on a flow teacher is its Euler step (§17.2) ------------------------------------


@pytest.mark.parametrize("flip", [False, True], ids=["rectified-flow", "sit"])
def test_ddim_on_a_flow_teacher_is_an_euler_step_of_its_velocity(flip):
  """`z_fm(s) = z_fm(t) + (s_fm - t_fm) u(z_fm, t_fm)` (flipped: in tau = 1 - t_fm), step for
  step, and the whole K-step DDIM sampler on the shifted flow schedule is the teacher's own
  Euler sampler on its shifted grid, written out in float64 here."""
  schedule = schedules.flow_matching(shift=3.0)

  def velocity(z_fm, time, labels):  # any velocity field: not the exact one, not linear
    del labels
    return jnp.sin(2.0 * z_fm) + (time[:, None] - 0.3) * z_fm

  denoise = teachers.on_schedule(
      teachers.adapt(velocity, frame="flow", prediction="velocity", flip_time=flip), schedule)
  z = jax.random.normal(jax.random.PRNGKey(8), (16, 4))
  K = 8
  times = np.linspace(1.0, 0.0, K + 1)
  # The teacher's own times: t_fm = sigmoid(-logsnr / 2) of the schedule, in float64.
  lam = np.asarray(schedule.logsnr(jnp.asarray(times, jnp.float32)), np.float64)
  t_fm = 1.0 / (1.0 + np.exp(lam / 2))
  norm = np.sqrt(1 / (1 + np.exp(-lam))) + np.sqrt(1 / (1 + np.exp(lam)))  # alpha + sigma
  # t = 0 is the data itself, as the solvers take it (§2.1): flow time 0, alpha + sigma = 1.
  t_fm[-1], norm[-1] = 0.0, 1.0
  teacher_time = 1.0 - t_fm if flip else t_fm

  ddim_step = jax.jit(lambda z, t, s: solvers.ddim(denoise(z, jnp.full((16,), t)), z, t, s,
                                                    schedule))
  teacher_velocity = jax.jit(lambda z_fm, time: velocity(z_fm, jnp.full((16,), time), None))
  u_at = lambda z_fm, k: np.asarray(teacher_velocity(jnp.asarray(z_fm, jnp.float32),
                                                     jnp.float32(teacher_time[k])), np.float64)
  z_ours = z
  z_fm = np.asarray(z, np.float64) / norm[0]
  for k in range(K):
    step = ddim_step(z_ours, jnp.float32(times[k]), jnp.float32(times[k + 1]))
    # Euler from the same point, in the teacher's variables.
    start = np.asarray(z_ours, np.float64) / norm[k]
    euler = start + (teacher_time[k + 1] - teacher_time[k]) * u_at(start, k)
    np.testing.assert_allclose(np.asarray(step, np.float64) / norm[k + 1], euler, atol=2e-6)
    z_ours = step
    # The teacher's Euler sampler, on its own.
    z_fm = z_fm + (teacher_time[k + 1] - teacher_time[k]) * u_at(z_fm, k)
  # The Euler end point (flow time 0, tau = 1) is the DDIM sample.
  np.testing.assert_allclose(sampling.sample(denoise, z, schedule, K, "ddim"), z_fm, atol=1e-5)
  np.testing.assert_allclose(np.asarray(z_ours), z_fm, atol=1e-5)


# --- frames and predictions: closed forms and round trips (§17) ----------------------------------


def _f64_alpha_sigma(lam):
  lam = np.asarray(lam, np.float64)
  return np.sqrt(1 / (1 + np.exp(-lam))), np.sqrt(1 / (1 + np.exp(lam)))


def test_frame_maps_are_the_closed_forms():
  lam = np.linspace(-25.0, 25.0, 101).astype(np.float32)
  z = np.asarray(jax.random.normal(jax.random.PRNGKey(9), (101, 3)), np.float64)
  a, s = _f64_alpha_sigma(lam)
  x_ve, sigma_ve = frames.vp_to_ve(z, lam)
  np.testing.assert_allclose(x_ve, z / a[:, None], rtol=4 * EPS32)
  # exp(-lam / 2) of a float32 lam: relative error EPS32 |lam| / 2 from lam's own rounding.
  assert np.all(np.abs(np.asarray(sigma_ve) / (s / a) - 1) <= 4 * EPS32 * (1 + np.abs(lam)))
  for flip in (False, True):
    z_fm, t = frames.vp_to_flow(z, lam, flip)
    np.testing.assert_allclose(z_fm, z / (a + s)[:, None], rtol=4 * EPS32)
    want = a / (a + s) if flip else s / (a + s)
    assert np.all(np.abs(np.asarray(t) / want - 1) <= 4 * EPS32 * (1 + np.abs(lam)))
  # The flow interpolation itself: z / (alpha + sigma) = (1 - t) x + t eps.
  x, eps = z, z[::-1]
  z_vp = a[:, None] * x + s[:, None] * eps
  z_fm, t = frames.vp_to_flow(z_vp, lam)
  t = np.asarray(t, np.float64)[:, None]
  np.testing.assert_allclose(z_fm, (1 - t) * x + t * eps, atol=8 * EPS32 * np.abs(z).max())


@pytest.mark.parametrize("prediction,flip", [("x", False), ("eps", False), ("v", False),
                                             ("velocity", False), ("velocity", True)])
def test_each_prediction_gives_the_true_x_and_eps(prediction, flip):
  """The true target of `z = alpha x + sigma eps` maps back to (x, eps), float64 built."""
  lam = np.linspace(-10.0, 10.0, 81)
  kx, ke = jax.random.split(jax.random.PRNGKey(10))
  x = np.asarray(jax.random.normal(kx, (81, 6)), np.float64)
  eps = np.asarray(jax.random.normal(ke, (81, 6)), np.float64)
  a, s = (c[:, None] for c in _f64_alpha_sigma(lam))
  z = a * x + s * eps
  t = s / (a + s)
  target = {"x": x, "eps": eps, "v": a * eps - s * x,
            "velocity": (x - eps) if flip else (eps - x)}[prediction]
  x_hat, eps_hat = frames.x_eps_from_prediction(prediction, target, z, lam, flip)
  # Each division amplifies float32 rounding by 1/alpha (eps -> x) or 1/sigma (x -> eps).
  tol = 8 * EPS32 * (1 + np.abs(z) + np.abs(target)) / np.minimum(a, s)
  assert np.all(np.abs(np.asarray(x_hat) - x) <= tol)
  assert np.all(np.abs(np.asarray(eps_hat) - eps) <= tol)
  back = frames.prediction_from_x_eps(prediction, x, eps, lam, flip)
  np.testing.assert_allclose(back, target, atol=8 * EPS32 * 4, rtol=8 * EPS32)
  if prediction == "velocity":
    # It is the velocity of the path in the frame's own coordinates: z_fm of one (x, eps) is
    # linear in the flow time, with slope eps - x (SiT's time: x - eps).
    path = np.linspace(-4.0, 4.0, 9)
    pa, ps = (c[:, None] for c in _f64_alpha_sigma(path))
    z_fm, time = (np.asarray(c, np.float64)
                  for c in frames.vp_to_flow(pa * x[0] + ps * eps[0], path, flip))
    slope = np.diff(z_fm, axis=0) / np.diff(time)[:, None]
    want = (x[0] - eps[0]) if flip else (eps[0] - x[0])
    np.testing.assert_allclose(slope, np.broadcast_to(want, slope.shape), atol=1e-4)


PREDICTION_KINDS = [("x", False), ("eps", False), ("v", False), ("velocity", False),
                    ("velocity", True)]


@pytest.mark.parametrize("source", PREDICTION_KINDS, ids=lambda p: p[0] + ("-flip" if p[1] else ""))
def test_prediction_round_trips_are_the_identity(source):
  lam = np.linspace(-10.0, 10.0, 41).astype(np.float32)
  z = jax.random.normal(jax.random.PRNGKey(11), (41, 5))
  out = jax.random.normal(jax.random.PRNGKey(12), (41, 5))
  a, s = (np.asarray(c, np.float64)[:, None] for c in frames.alpha_sigma(lam))
  for target, flip in PREDICTION_KINDS:
    if flip != source[1] and "velocity" in (source[0], target):
      continue
    there = frames.convert_prediction(out, z, lam, source[0], target, flip)
    back = frames.convert_prediction(there, z, lam, target, source[0], flip)
    tol = 16 * EPS32 * (1 + np.abs(np.asarray(z)) + np.abs(np.asarray(out))) / np.minimum(a, s)
    assert np.all(np.abs(np.asarray(back) - np.asarray(out)) <= tol), (source, target)


def test_frame_round_trips_are_the_identity():
  lam = np.linspace(-25.0, 25.0, 201).astype(np.float32)
  z = jax.random.normal(jax.random.PRNGKey(13), (201, 3))
  z_back, lam_back = frames.ve_to_vp(*frames.vp_to_ve(z, lam))
  np.testing.assert_allclose(z_back, z, rtol=4 * EPS32, atol=1e-30)
  assert np.all(np.abs(np.asarray(lam_back) - lam) <= 4 * EPS32 * (1 + np.abs(lam)))
  sigma_ve = np.logspace(-6, 6, 201).astype(np.float32)
  x_ve = np.asarray(z) * 7.0
  xb, sb = frames.vp_to_ve(*frames.ve_to_vp(x_ve, sigma_ve))
  np.testing.assert_allclose(xb, x_ve, rtol=4 * EPS32)
  np.testing.assert_allclose(sb, sigma_ve, rtol=32 * EPS32)
  for flip in (False, True):
    z_fm, t = frames.vp_to_flow(z, lam, flip)
    z_back, lam_back = frames.flow_to_vp(z_fm, t, flip)
    np.testing.assert_allclose(z_back, z, rtol=8 * EPS32)
    # t is stored in float32; a rounding of t moves logSNR by 2 EPS32 / min(t, 1 - t).
    t64 = np.asarray(t, np.float64)
    assert np.all(np.abs(np.asarray(lam_back) - lam)
                  <= 4 * EPS32 * (1 + np.abs(lam)) / np.minimum(t64, 1 - t64))
    t_in = np.linspace(1e-6, 1 - 1e-6, 201).astype(np.float32)
    z_back, t_back = frames.vp_to_flow(*frames.flow_to_vp(x_ve, t_in, flip), flip)
    np.testing.assert_allclose(z_back, x_ve, rtol=8 * EPS32)
    np.testing.assert_allclose(t_back, t_in, rtol=8 * EPS32, atol=2 * EPS32)


# --- the teachers' schedules (§17.1-§17.3) -------------------------------------------------------

NEW_SCHEDULES = [schedules.edm(), schedules.ddpm_linear(), schedules.flow_matching(),
                 schedules.flow_matching(shift=3.0), schedules.flow_matching(0.5, -12.0, 14.0)]


@pytest.mark.parametrize("schedule", NEW_SCHEDULES, ids=lambda s: repr(s))
def test_new_schedules_are_monotone_vp_and_inverted(schedule):
  t = jnp.linspace(0.0, 1.0, 513)
  lam = np.asarray(schedule.logsnr(t))
  assert np.all(np.diff(lam) < 0)
  a, s = schedule.alpha_sigma(t)
  np.testing.assert_allclose(a ** 2 + s ** 2, 1.0, atol=2e-6)
  np.testing.assert_allclose(schedule.t_from_logsnr(lam), t, atol=4e-7)
  # Inside the frames' clip, so the clip changes nothing the schedule produces (§17.4).
  assert np.all(np.abs(lam) <= frames.LOGSNR_CLIP)


def test_edm_schedule_is_edms_sigma_range_and_rho_spacing():
  sch = schedules.edm()
  t = np.linspace(0, 1, 101)
  a, b = 0.002 ** (1 / 7), 80.0 ** (1 / 7)
  sigma = (a + t * (b - a)) ** 7
  np.testing.assert_allclose(sch.logsnr(t), -2 * np.log(sigma), rtol=1e-6, atol=2e-6)
  np.testing.assert_allclose(sch.logsnr(jnp.array([0.0, 1.0])),
                             [-2 * math.log(0.002), -2 * math.log(80.0)], rtol=1e-6)
  # EDM's eq. 5 on its own sigma range is uniform in t: the Karras grid is k / K (§16.3).
  np.testing.assert_allclose(sampling.karras_grid(8, sch), np.linspace(1, 0, 9), atol=2e-6)


def test_ddpm_schedule_is_the_discrete_table_at_the_steps():
  sch = schedules.ddpm_linear()
  n = np.arange(1000)
  want = np.log(DDPM_ALPHA_BAR / (1 - DDPM_ALPHA_BAR))
  got = np.asarray(sch.logsnr(jnp.asarray(n / 999, jnp.float32)), np.float64)
  # float32 steps: t = n / 999 rounds by ~3e-8 and moves logSNR by at most ~1e-5 there.
  np.testing.assert_allclose(got, want, atol=3e-5, rtol=2e-6)
  assert abs(got[0] - math.log((1 - 1e-4) / 1e-4)) < 1e-4
  # Between the steps log alpha_bar is linear in t (constant beta within a step).
  mid = np.asarray(sch.log_alpha_bar(jnp.asarray((n[:-1] + 0.5) / 999, jnp.float32)))
  la = np.log(DDPM_ALPHA_BAR)
  np.testing.assert_allclose(mid, 0.5 * (la[:-1] + la[1:]), rtol=1e-5, atol=1e-7)
  # The inverse lands on the steps: the adapter calls DiT at n = 999 t (§17.3).
  back = np.asarray(sch.t_from_logsnr(jnp.asarray(want, jnp.float32)), np.float64) * 999
  np.testing.assert_allclose(back, n, atol=2e-3)


def test_dit_teacher_at_its_own_integer_steps():
  """At the logSNR of DiT's step n (its float64 table), the adapter calls it at n and returns the
  exact posterior mean at that step's alpha_bar."""
  n = np.arange(0, 1000, 37)
  ab = DDPM_ALPHA_BAR[n]
  lam = jnp.asarray(np.log(ab / (1 - ab)), jnp.float32)
  kx, ke = jax.random.split(jax.random.PRNGKey(15))
  x = MIX.sample(kx, n.size)[0]
  a = jnp.asarray(np.sqrt(ab), jnp.float32)
  s = jnp.asarray(np.sqrt(1 - ab), jnp.float32)
  z = a[:, None] * x + s[:, None] * jax.random.normal(ke, x.shape)
  kw = dict(frame="vp", schedule=DDPM, time_scale=999.0)
  _, steps = teachers.teacher_inputs(z, lam, **kw)
  np.testing.assert_allclose(steps, n, atol=2e-3)
  dit = teachers.adapt(ddpm_teacher("eps"), prediction="eps", **kw)
  got, want = (np.asarray(a) for a in jax.jit(
      lambda z: (dit(z, lam), posterior(z, a, s)[0]), compiler_options=FAST_COMPILE)(z))
  bound = 8 * EPS32 * (1 + np.max(np.abs(np.asarray(z)), -1)) / np.asarray(a)
  assert np.all(np.max(np.abs(got - want), -1) <= bound)


def test_flow_schedule_is_sd3s_shift():
  for shift in (1.0, 3.0):
    sch = schedules.flow_matching(shift=shift)
    t = np.linspace(0, 1, 201)
    b = 2 * math.log(shift)
    u0 = 1 / (1 + math.exp((30 + b) / 2))
    u1 = 1 / (1 + math.exp((-30 + b) / 2))
    u = u0 + t * (u1 - u0)
    t_teacher = shift * u / (1 + (shift - 1) * u)  # SD3's shifted time
    want = 2 * np.log((1 - t_teacher) / t_teacher)
    np.testing.assert_allclose(sch.logsnr(t), want, rtol=4e-6, atol=4e-6)
    np.testing.assert_allclose(sch.logsnr(jnp.array([0.0, 1.0])), [30, -30], atol=2e-5)
    # Our t is the teacher's unshifted time u to max(s, 1/s) 3.1e-7 (the clip), so a uniform
    # grid in t is the teacher's own, shifted, to float32 rounding.
    assert np.max(np.abs(u - t)) < max(shift, 1 / shift) * 3.1e-7
  default = schedules.FlowMatching()
  assert default.logsnr_max == frames.LOGSNR_CLIP == -default.logsnr_min


# --- the singular ends are clipped, and each clip is what it says (§17.4) -----------------------


def test_clip_constants_agree():
  a, s = frames.alpha_sigma(jnp.array([-frames.LOGSNR_CLIP, frames.LOGSNR_CLIP]))
  np.testing.assert_allclose([a[0], s[1]], frames.ALPHA_MIN, rtol=1e-6)
  assert frames.SIGMA_MIN == frames.ALPHA_MIN
  np.testing.assert_allclose(frames.sigma_ve_from_logsnr(jnp.array([30.0, -30.0])),
                             [frames.SIGMA_VE_MIN, frames.SIGMA_VE_MAX], rtol=1e-6)
  t = np.asarray(frames.flow_time_from_logsnr(jnp.array([30.0, -30.0])))
  np.testing.assert_allclose(t[0], frames.FLOW_T_MIN, rtol=1e-6)
  assert 0.0 < t[0] and t[1] < 1.0  # both ends still distinct from 0 and 1 in float32
  # Beyond the clip's ends, the times of each frame are the ends' own.
  np.testing.assert_allclose(frames.logsnr_from_sigma_ve(jnp.array([0.0, 1e30])), [30, -30])
  np.testing.assert_allclose(frames.logsnr_from_flow_time(jnp.array([0.0, 1.0])), [30, -30],
                             atol=0.2)  # FLOW_T_MAX rounds to 1 - 5 * 2^-24 in float32
  np.testing.assert_array_equal(frames.clip_logsnr(jnp.array([-jnp.inf, jnp.inf])), [-30, 30])


def test_teacher_is_called_at_its_own_time_and_labels_pass_through():
  seen = {}

  def spy(z, time, labels):
    seen["z"], seen["time"], seen["labels"] = z, time, labels
    return z

  z = jnp.ones((3, 2)) * 0.5
  lam = jnp.array([-4.0, 0.0, 6.0])
  labels = jnp.array([1, 2, 3])
  a, s = (np.asarray(c, np.float64) for c in _f64_alpha_sigma(lam))
  teachers.adapt(spy, frame="ve", prediction="x")(z, lam, labels)
  np.testing.assert_allclose(seen["time"], s / a, rtol=1e-6)
  np.testing.assert_allclose(seen["z"], 0.5 / a[:, None] * np.ones((3, 2)), rtol=1e-6)
  assert seen["labels"] is labels
  teachers.adapt(spy, frame="flow", prediction="velocity", time_scale=1000.0)(z, lam, labels)
  np.testing.assert_allclose(seen["time"], 1000 * s / (a + s), rtol=1e-6)
  teachers.adapt(spy, frame="flow", prediction="velocity", flip_time=True)(z, lam, labels)
  np.testing.assert_allclose(seen["time"], a / (a + s), rtol=1e-6)
  teachers.adapt(spy, frame="vp", prediction="v")(z, lam, labels)
  np.testing.assert_array_equal(seen["time"], lam)
  # DiT: step n where its alpha_bar gives our logSNR, at the integer steps.
  n = np.array([0, 250, 999])
  lam_n = np.log(DDPM_ALPHA_BAR[n] / (1 - DDPM_ALPHA_BAR[n]))
  dit = teachers.adapt(spy, frame="vp", prediction="eps", schedule=DDPM, time_scale=999.0)
  dit(z, jnp.asarray(lam_n, jnp.float32), None)
  np.testing.assert_allclose(seen["time"], n, atol=2e-3)
  # A scalar logSNR is one time per example.
  teachers.adapt(spy, frame="ve", prediction="x")(z, 2.0, None)
  assert seen["time"].shape == (3,)


def test_an_adapted_teacher_takes_classifier_free_guidance():
  """`on_schedule` keeps the labels argument, so guidance wraps an adapted teacher as ours."""
  def class_mean(x_ve, sigma, labels):  # an x-predicting VE teacher: its class's mean
    del sigma
    return jnp.broadcast_to(labels[:, None].astype(jnp.float32), x_ve.shape)

  f = teachers.on_schedule(teachers.adapt(class_mean, frame="ve", prediction="x"), COSINE)
  z, t, labels = jnp.zeros((3, 2)), jnp.full((3,), 0.5), jnp.array([1, 2, 3])
  guided = sampling.classifier_free_guidance(f, labels, 10, 1.5)(z, t)
  np.testing.assert_allclose(guided, np.broadcast_to(
      (np.array([1, 2, 3]) + 1.5 * (np.array([1, 2, 3]) - 10))[:, None], (3, 2)))


# --- refusals: one line, naming the argument ------------------------------------------------------


def _identity(z, time, labels):
  del time, labels
  return z


REFUSALS = [
    (dict(frame="edm", prediction="x"), "frame"),
    (dict(frame="vp", prediction="score"), "prediction"),
    (dict(frame="ve", prediction="velocity"), "prediction"),
    (dict(frame="ve", prediction="v"), "prediction"),
    (dict(frame="flow", prediction="v"), "prediction"),
    (dict(frame="vp", prediction="velocity"), "prediction"),
    (dict(frame="vp", prediction="eps", flip_time=True), "flip_time"),
    (dict(frame="ve", prediction="x", flip_time=True), "flip_time"),
    (dict(frame="flow", prediction="velocity", flip_time=1), "flip_time"),
    (dict(frame="vp", prediction="eps", time_scale=1000.0), "schedule"),
    (dict(frame="ve", prediction="x", schedule=schedules.edm()), "schedule"),
    (dict(frame="flow", prediction="velocity", schedule=schedules.flow_matching()), "schedule"),
    (dict(frame="vp", prediction="eps", schedule="ddpm"), "schedule"),
    (dict(frame="flow", prediction="velocity", time_scale=0.0), "time_scale"),
    (dict(frame="flow", prediction="velocity", time_scale=float("inf")), "time_scale"),
]


@pytest.mark.parametrize("kwargs,argument", REFUSALS,
                         ids=[f"{arg}-{i}" for i, (_, arg) in enumerate(REFUSALS)])
def test_wrong_combinations_are_refused_in_one_line(kwargs, argument):
  for build in (teachers.adapt, teachers.adapt_x_eps):
    with pytest.raises(ValueError) as info:
      build(_identity, **kwargs)
    message = str(info.value)
    assert "\n" not in message and message.startswith(argument), message
  with pytest.raises(ValueError, match="^apply_fn"):
    teachers.adapt(None, frame="vp", prediction="v")


def test_every_allowed_combination_builds():
  for frame, carried in teachers.CARRIES.items():
    for prediction in carried:
      teachers.adapt(_identity, frame=frame, prediction=prediction)
  teachers.adapt(_identity, frame="flow", prediction="velocity", flip_time=True, time_scale=1e3)
  teachers.adapt(_identity, frame="vp", prediction="eps", schedule=schedules.ddpm_linear(),
                 time_scale=999)
