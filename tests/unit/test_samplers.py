"""Euler, Heun, Karras spacing and aDDIM's final step against closed-form truth (§16, §5.3).

The exact denoiser of a Gaussian mixture stands in for the network, so every error
measured here is the sampler's own.
"""
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import helpers

from multistep_cm.data import mixture as mixture_lib
from multistep_cm.diffusion import sampling
from multistep_cm.diffusion import schedules
from multistep_cm.diffusion import solvers

COSINE = schedules.cosine()
SCHEDULES = [COSINE, schedules.cosine(-10.0, 12.0), schedules.shifted_cosine(64, 32),
             schedules.interpolated_cosine(64, 32)]


@pytest.fixture(scope="module")
def mix():
  return mixture_lib.default_mixture(dim=8, seed=0)


def _denoiser(mix, schedule=COSINE):
  return lambda z, t: mix.denoise(z, t, schedule)


def _rms(a, b):
  return float(jnp.sqrt(jnp.mean(jnp.sum(jnp.square(a - b), -1))))


def _check_inverse(schedule):
  t = jnp.linspace(0.0, 1.0, 201)
  np.testing.assert_allclose(schedule.t_from_logsnr(schedule.logsnr(t)), t, atol=3e-7)
  # logSNR -> t -> logSNR: exact to the resolution of t in float32 (near t = 1 one ulp of
  # t moves logSNR by ~2e-4; the shift adds a rounding), so the target lies between logSNR
  # at t -/+ 4 ulp.
  logsnr = np.linspace(float(schedule.logsnr(1.0)), float(schedule.logsnr(0.0)), 201)[1:-1]
  t = np.asarray(schedule.t_from_logsnr(jnp.asarray(logsnr, jnp.float32)))
  ulp = np.spacing(t)
  above = np.asarray(schedule.logsnr(jnp.asarray(t - 4 * ulp)))
  below = np.asarray(schedule.logsnr(jnp.asarray(t + 4 * ulp)))
  target = logsnr.astype(np.float32)
  assert np.all((below <= target) & (target <= above)), (type(schedule).__name__, below,
                                                         target, above)


def test_t_from_logsnr_inverts_logsnr():
  """Checked as the commands run it, at XLA's default optimisation level: the suite runs at
  level 0 (tests/conftest.py), whose float32 rounding of these functions differs by a few
  ulp, so the check runs in a child process (`python -m unit.test_samplers`)."""
  helpers.run_module("unit.test_samplers", devices=1, env={"XLA_FLAGS": ""})


@pytest.mark.parametrize("schedule", SCHEDULES[:3], ids=lambda s: type(s).__name__)
def test_cosine_inverse_is_the_closed_form(schedule):
  # tan(t_min + t (t_max - t_min)) = exp(-(logsnr - shift) / 2), solved for t in float64.
  lo, hi = schedule.logsnr_min, schedule.logsnr_max
  shift = float(schedule.logsnr(0.0)) - hi
  t_min, t_max = math.atan(math.exp(-hi / 2)), math.atan(math.exp(-lo / 2))
  logsnr = np.linspace(lo, hi, 50) + shift
  want = (np.arctan(np.exp(-(logsnr - shift) / 2)) - t_min) / (t_max - t_min)
  np.testing.assert_allclose(schedule.t_from_logsnr(logsnr), want, atol=2e-7)


def test_euler_in_edm_coordinates_is_ddim_step_for_step(mix):
  """sigma = exp(-logSNR/2), x = z/alpha: x' = x + (sigma' - sigma)(x - x̂)/sigma is eq. (4)."""
  den = _denoiser(mix)

  @jax.jit
  def one_step(z, t, s):
    x_hat = den(z, jnp.full((z.shape[0],), t))
    # DDIM written out from eq. (4), not through solvers.ddim.
    a_t, s_t = solvers.alpha_sigma(COSINE, t)
    a_s, s_s = solvers.alpha_sigma(COSINE, s)
    z_ddim = a_s * x_hat + (s_s / s_t) * (z - a_t * x_hat)
    x_euler = sampling.sample_edm(den, z / a_t, COSINE, jnp.stack([t, s]), False)
    return a_s * x_euler, z_ddim, a_s / a_t

  z = jax.random.normal(jax.random.PRNGKey(0), (64, 8))
  for spacing in sampling.SPACINGS:
    times = sampling.time_grid(8, COSINE, spacing)
    for i in range(8):
      z_euler, z_ddim, ratio = one_step(z, times[i], times[i + 1])
      # x = z / alpha is ~1800 z at t = 1: float32 rounds it to ~1e-4 absolute.
      np.testing.assert_allclose(z_euler, z_ddim, rtol=1e-4, atol=2e-4 * float(ratio))
      z = z_ddim
  # ... and so the whole samplers agree.
  z = jax.random.normal(jax.random.PRNGKey(1), (64, 8))
  np.testing.assert_allclose(sampling.sample(den, z, COSINE, 8, "euler"),
                             sampling.sample(den, z, COSINE, 8, "ddim"), atol=1e-3)


def test_heun_converges_faster_than_euler_at_equal_nfe(mix):
  den = _denoiser(mix)
  z = jax.random.normal(jax.random.PRNGKey(2), (256, 8))
  run = jax.jit(lambda z, k, smp: sampling.sample(den, z, COSINE, k, smp, spacing="karras"),
                static_argnums=(1, 2))
  reference = run(z, 1024, "heun")  # a fine solve of the same ODE from the same noise
  # On this mixture (modes of width 0.05) Heun needs ~64 evaluations before its order shows.
  nfes = (64, 256)
  euler = [_rms(run(z, n, "euler"), reference) for n in nfes]
  heun = [_rms(run(z, n // 2, "heun"), reference) for n in nfes]  # n - 1 evaluations
  assert heun[0] < 0.7 * euler[0] and heun[1] < 0.25 * euler[1], (euler, heun)
  # 4x the evaluations: first order divides Euler's error by ~4, second order Heun's by ~16.
  assert 2.5 < euler[0] / euler[1] < 6, euler
  assert heun[0] / heun[1] > 10, heun


def test_addim_with_a_ddim_final_step(mix):
  """All steps aDDIM, except the last (to t = 0): DDIM, which returns x̂ there."""
  den = _denoiser(mix)
  z = jax.random.normal(jax.random.PRNGKey(3), (64, 8))
  k = 4
  times = sampling.uniform_grid(k)
  before_last = sampling.sample_on_grid(den, z, COSINE, times[:-1], "addim", final_step="addim")
  x_hat = den(before_last, jnp.full((64,), times[-2]))
  got = sampling.sample(den, z, COSINE, k, "addim", final_step="ddim")
  np.testing.assert_allclose(got, x_hat, atol=1e-6)
  np.testing.assert_allclose(
      got, solvers.ddim(x_hat, before_last, times[-2], 0.0, COSINE), atol=1e-6)
  # The earlier steps are aDDIM's: the all-aDDIM sampler differs only by the final noise.
  all_addim = sampling.sample(den, z, COSINE, k, "addim", final_step="addim")
  x_var = solvers.analytic_x_var(times[-2], COSINE)
  eps = (before_last - solvers.alpha_sigma(COSINE, times[-2])[0] * x_hat) / solvers.alpha_sigma(
      COSINE, times[-2])[1]
  scale = jnp.sqrt(x_var / jnp.mean(jnp.square(eps), -1, keepdims=True))  # c(t, 0) = 1
  np.testing.assert_allclose(all_addim, x_hat + scale * eps, atol=1e-5)
  assert not np.allclose(all_addim, got, atol=1e-3)
  np.testing.assert_allclose(sampling.sample(den, z, COSINE, k, "addim"),
                             sampling.sample(den, z, COSINE, k, "addim",
                                             final_step=sampling.DEFAULT_FINAL_STEP))
  with pytest.raises(ValueError, match="final_step"):
    sampling.sample(den, z, COSINE, k, "heun", final_step="ddim")
  with pytest.raises(ValueError, match="final_step"):
    sampling.sample(den, z, COSINE, k, "addim", final_step="euler")


@pytest.mark.parametrize("schedule", [COSINE, schedules.interpolated_cosine(64, 32)],
                         ids=lambda s: type(s).__name__)
def test_karras_spacing(schedule):
  lam = np.asarray(schedule.logsnr(jnp.asarray([1.0, 0.0])), np.float64)
  s_max, s_min = np.exp(-lam / 2)
  for num_steps in (1, 2, 5, 16):
    times = np.asarray(sampling.karras_grid(num_steps, schedule), np.float64)
    assert times.shape == (num_steps + 1,) and times[0] == 1.0 and times[-1] == 0.0
    assert np.all(np.diff(times) < 0)
    # In sigma = exp(-logSNR/2), the points follow eq. (5) of EDM with rho = 7 between the
    # schedule's sigma_max (t = 1) and sigma_min (t = 0). Near t = 1 one float32 ulp of t
    # moves sigma by ~1e-4 relative.
    i = np.arange(num_steps + 1) / num_steps
    want = (s_max ** (1 / 7) + i * (s_min ** (1 / 7) - s_max ** (1 / 7))) ** 7
    got = np.exp(-np.asarray(schedule.logsnr(jnp.asarray(times, jnp.float32)), np.float64) / 2)
    np.testing.assert_allclose(got, want, rtol=5e-4)
  with pytest.raises(ValueError, match="spacing"):
    sampling.time_grid(4, schedule, "edm")


@pytest.mark.parametrize("sampler,num_steps", [("ddim", 3), ("addim", 3), ("euler", 3),
                                                ("heun", 3), ("heun", 1)])
def test_network_evaluations(mix, sampler, num_steps):
  """One trace, counted at run time: Heun's K steps cost 2K - 1 evaluations, the others K."""
  calls = []

  def counting(z, t):
    jax.debug.callback(lambda: calls.append(1), ordered=True)
    return mix.denoise(z, t, COSINE)

  z = jax.random.normal(jax.random.PRNGKey(4), (8, 8))
  fn = jax.jit(lambda z: sampling.sample(counting, z, COSINE, num_steps, sampler,
                                         spacing="karras"))
  jax.block_until_ready(fn(z))
  jax.effects_barrier()
  want = 2 * num_steps - 1 if sampler == "heun" else num_steps
  assert len(calls) == want and sampling.nfe(sampler, num_steps) == want


if __name__ == "__main__":
  for each in SCHEDULES:
    _check_inverse(each)
