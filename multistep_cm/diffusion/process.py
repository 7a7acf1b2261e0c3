"""The forward process and the network's v-parameterization (docs/maths.md §1.1, §1.3).

`z_t = alpha_t x + sigma_t eps`; the network predicts `v = alpha_t eps - sigma_t x`,
so `x̂ = alpha_t z_t - sigma_t v̂`. At t = 0 the data endpoint (alpha, sigma) = (1, 0)
gives `x̂ = z_0`: the consistency boundary condition holds by construction.
"""
from multistep_cm.diffusion import solvers


def diffuse(x, eps, t, schedule):
  """`z_t = alpha_t x + sigma_t eps`, t a scalar or `[B]`."""
  alpha, sigma = solvers.alpha_sigma(schedule, t)
  return solvers.bcast(alpha, x) * x + solvers.bcast(sigma, x) * eps


def x_from_v(v, z, t, schedule):
  """`x̂ = alpha_t z_t - sigma_t v̂`."""
  alpha, sigma = solvers.alpha_sigma(schedule, t)
  return solvers.bcast(alpha, z) * z - solvers.bcast(sigma, z) * v

