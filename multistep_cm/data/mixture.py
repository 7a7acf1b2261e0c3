"""A Gaussian mixture with an exact denoiser: the toy data and the ideal teacher.

`p(x) = sum_k pi_k N(x; mu_k, s_k^2 I)`. Under `z_t = alpha x + sigma eps`, each
component gives `z_t ~ N(alpha mu_k, v_k I)` with `v_k = alpha^2 s_k^2 + sigma^2`,
and, given z_t and k, `x ~ N(m_k, tau_k^2 I)` with
`m_k = mu_k + (alpha s_k^2 / v_k)(z_t - alpha mu_k)` and `tau_k^2 = s_k^2 sigma^2 / v_k`.
So `E[x | z_t] = sum_k r_k m_k` with responsibilities `r_k ~ pi_k N(z_t; alpha mu_k, v_k I)`,
and `tr Var[x | z_t] = sum_k r_k (d tau_k^2 + ||m_k||^2) - ||E[x | z_t]||^2`.
The optimum of the diffusion objective is `E[x | z_t]` (§1.1), so this denoiser is
the perfect teacher, and the samplers' and students' errors can be measured
against the true distribution.
"""
import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

from multistep_cm.diffusion import solvers


@dataclasses.dataclass(frozen=True)
class GaussianMixture:
  """Isotropic components: `means [K, D]`, `stds [K]`, `weights [K]` (summing to 1)."""
  means: np.ndarray
  stds: np.ndarray
  weights: np.ndarray

  @property
  def dim(self) -> int:
    return self.means.shape[1]

  @property
  def num_components(self) -> int:
    return self.means.shape[0]

  def sample(self, key, n: int):
    """Returns `(x [n, D], component [n])`."""
    k_comp, k_noise = jax.random.split(key)
    comp = jax.random.choice(k_comp, self.num_components, (n,), p=jnp.asarray(self.weights))
    noise = jax.random.normal(k_noise, (n, self.dim))
    x = jnp.asarray(self.means)[comp] + jnp.asarray(self.stds)[comp, None] * noise
    return x.astype(jnp.float32), comp

  def _posterior(self, z, alpha, sigma):
    mu = jnp.asarray(self.means, jnp.float32)
    s2 = jnp.square(jnp.asarray(self.stds, jnp.float32))
    alpha, sigma = alpha[:, None], sigma[:, None]  # [B, 1]
    v = jnp.square(alpha) * s2[None] + jnp.square(sigma)  # [B, K]
    diff = z[:, None, :] - alpha[:, :, None] * mu[None]  # [B, K, D]
    log_r = (jnp.log(jnp.asarray(self.weights, jnp.float32))[None]
             - 0.5 * jnp.sum(jnp.square(diff), -1) / v - 0.5 * self.dim * jnp.log(v))
    r = jax.nn.softmax(log_r, axis=-1)  # [B, K]
    m = mu[None] + (alpha * s2[None] / v)[..., None] * diff  # [B, K, D]
    tau2 = s2[None] * jnp.square(sigma) / v  # [B, K]
    return r, m, tau2

  def denoise(self, z, t, schedule):
    """The exact `E[x | z_t]` for `z [B, D]` and `t [B]` (t > 0)."""
    alpha, sigma = solvers.alpha_sigma(schedule, jnp.broadcast_to(t, z.shape[:1]))
    r, m, _ = self._posterior(z, alpha, sigma)
    return jnp.einsum("bk,bkd->bd", r, m)

  def posterior_variance(self, z, t, schedule):
    """The exact `tr Var[x | z_t] / d` per example, `[B]`."""
    alpha, sigma = solvers.alpha_sigma(schedule, jnp.broadcast_to(t, z.shape[:1]))
    r, m, tau2 = self._posterior(z, alpha, sigma)
    mean = jnp.einsum("bk,bkd->bd", r, m)
    second = jnp.sum(r * (self.dim * tau2 + jnp.sum(jnp.square(m), -1)), -1)
    return (second - jnp.sum(jnp.square(mean), -1)) / self.dim


def default_mixture(dim: int = 8, seed: int = 0) -> GaussianMixture:
  """Five modes of widths 0.05 to 0.4 with unequal weights.

  Mode centres lie at radius ~1.5 (times sqrt(dim / 8)), so each coordinate has a
  spread of ~0.5, the scale of images in [-1, 1] that the analytic aDDIM rule assumes.
  """
  rng = np.random.default_rng(seed)
  num = 5
  directions = rng.normal(size=(num, dim))
  directions /= np.linalg.norm(directions, axis=1, keepdims=True)
  means = 1.5 * directions * rng.uniform(0.8, 1.2, size=(num, 1)) * np.sqrt(dim / 8)
  stds = np.array([0.05, 0.1, 0.15, 0.25, 0.4])
  weights = np.array([0.3, 0.25, 0.2, 0.15, 0.1])
  return GaussianMixture(means=means.astype(np.float32), stds=stds.astype(np.float32),
                         weights=weights)
