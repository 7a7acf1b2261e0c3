"""Teachers of other codebases' kinds, for the tests: our digits UViT written in their frames.

Each module wraps `inner`, the digits UViT (v on logSNR), and is called in another
codebase's convention, converting with the formulas written out here (not with
multistep_cm.diffusion.frames):
* `Flow`: SD3 / Flux (data at t = 0, velocity eps - x, time x `scale`) or with `flip` SiT's
  (noise at t = 0, velocity x - eps), at `z_fm = (1 - t) x + t eps`;
* `VE`: EDM's `D(x_ve; sigma)`, x-prediction at `x_ve = x + sigma eps`;
* `DDPMEps`: DiT's eps-prediction on DDPM's linear betas, called at step n = 999 t.

So the adapter, given the matching conventions, must give back exactly the inner network:
`teacher.module = "tests/outside_teachers.py:<name>"` with the weights `{"inner": params}`.
"""
import flax.linen as nn
import jax
import jax.numpy as jnp

from multistep_cm.config import base as config_base
from multistep_cm.diffusion import schedules
from multistep_cm import models
from multistep_cm.models import adm


def _b(v, x):
  return v.reshape(v.shape + (1,) * (x.ndim - v.ndim))


def _inner_v(inner, z, logsnr, labels):
  """`(x̂, epŝ)` of our network at `(z, logsnr)`."""
  alpha, sigma = _b(jnp.sqrt(jax.nn.sigmoid(logsnr)), z), _b(jnp.sqrt(jax.nn.sigmoid(-logsnr)), z)
  v = inner(z, logsnr, labels)
  return alpha * z - sigma * v, sigma * z + alpha * v


class Flow(nn.Module):
  inner: nn.Module
  flip: bool = False
  scale: float = 1.0

  def __call__(self, z_fm, t, labels):
    t = t / self.scale
    t_data = 1.0 - t if self.flip else t  # the time at which 0 is the data
    logsnr = 2.0 * (jnp.log(1.0 - t_data) - jnp.log(t_data))  # alpha / sigma = (1 - t) / t
    alpha, sigma = jnp.sqrt(jax.nn.sigmoid(logsnr)), jnp.sqrt(jax.nn.sigmoid(-logsnr))
    z = _b(alpha + sigma, z_fm) * z_fm
    x, eps = _inner_v(self.inner, z, logsnr, labels)
    return x - eps if self.flip else eps - x


class VE(nn.Module):
  inner: nn.Module

  def __call__(self, x_ve, sigma, labels):
    logsnr = -2.0 * jnp.log(sigma)
    z = x_ve / _b(jnp.sqrt(1.0 + sigma**2), x_ve)
    return _inner_v(self.inner, z, logsnr, labels)[0]


class DDPMEps(nn.Module):
  inner: nn.Module
  scale: float = 999.0

  def __call__(self, z, n, labels):
    logsnr = schedules.ddpm_linear().logsnr(n / self.scale)
    return _inner_v(self.inner, z, logsnr, labels)[1]


def inner_network():
  """Our digits UViT at 8x8, as `digits_config` builds it (what tests/helpers.tiny_digits
  trains)."""
  return models.get_model_for_config(config_base.digits_config("diffusion"))


def flow_sd3():
  return Flow(inner=inner_network(), scale=1000.0)


def flow_sit():
  return Flow(inner=inner_network(), flip=True)


def edm():
  return VE(inner=inner_network())


def dit():
  return DDPMEps(inner=inner_network())


# EDM's ADM UNet with EDM's preconditioning at the digits' 8x8x1 and 10 classes (models/adm.py):
# a converted EDM checkpoint's network, small.
TINY_ADM = dict(img_resolution=8, in_channels=1, out_channels=1, label_dim=10,
                model_channels=32, channel_mult=(1, 2), channel_mult_emb=2, num_blocks=1,
                attn_resolutions=(4,), dropout=0.0)


def tiny_adm():
  return adm.EDMTeacher(adm.ADMUNet(**TINY_ADM))


def tiny_adm_remat():
  return adm.EDMTeacher(adm.ADMUNet(**TINY_ADM, remat=True))


# The teacher.* keys that describe each module (what a user writes in a config).
CONVENTIONS = {
    "flow_sd3": {"frame": "flow", "prediction": "velocity", "flow_time": "data_at_0",
                 "time_scale": 1000.0},
    "flow_sit": {"frame": "flow", "prediction": "velocity", "flow_time": "noise_at_0"},
    "edm": {"frame": "ve", "prediction": "x"},
    "dit": {"frame": "vp", "prediction": "eps", "schedule": "ddpm_linear", "time_scale": 999.0},
}
