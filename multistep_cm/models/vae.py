"""The Stable Diffusion VAE (`AutoencoderKL` of sd-vae-ft-ema / ft-mse) in Flax.

Rombach et al. (2022), as diffusers builds it. The encoder: a 3x3 conv, one down level per
entry of `block_out_channels` with `layers_per_block` ResNet blocks (GroupNorm, SiLU, 3x3 conv,
twice, with a 1x1 shortcut where the width changes) and a stride-2 3x3 conv after every level
but the last (padded only on the right and bottom), a mid block (ResNet, single-head spatial
self-attention with a GroupNorm and a residual, ResNet), GroupNorm-SiLU-conv to 2 x latent
channels, and the 1x1 `quant_conv`: the mean and log-variance of a diagonal Gaussian. The
decoder mirrors it after the 1x1 `post_quant_conv`, with `layers_per_block + 1` blocks per
level and a nearest x2 upsampling then 3x3 conv between levels. Every GroupNorm has
`norm_num_groups` groups and eps 1e-6.

Images are NHWC in [-1, 1]. `encode` gives the posterior mean (diffusers' `latent_dist.mean`),
`encode_sample` a draw from it (the log-variance clipped to [-30, 20] as diffusers does),
`decode` the image of a latent; a latent diffusion model sees `scaling_factor` times the
latent (`to_model` / `from_model`). Variable names follow diffusers' modules
(`encoder/down_blocks_1/resnets_0/conv1`) so that the converter (multistep_cm/convert.py) is a
rename and transposes. Parameters carry our logical axis names; convs run in `dtype`, the
GroupNorms and the attention's softmax in float32.
"""
import json
from typing import Any, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

Dtype = Any

# sd-vae-ft-ema / sd-vae-ft-mse (and SD 1.x's VAE).
SD_VAE = {"block_out_channels": (128, 256, 512, 512), "layers_per_block": 2,
          "latent_channels": 4, "norm_num_groups": 32, "in_channels": 3, "out_channels": 3,
          "mid_block_attention": True, "scaling_factor": 0.18215}
SETTINGS = tuple(SD_VAE)


def _conv(features, kernel, dtype, name, stride=1, padding="SAME"):
  return nn.Conv(features, (kernel, kernel), strides=(stride, stride), padding=padding,
                 dtype=dtype, param_dtype=jnp.float32,
                 kernel_init=nn.with_logical_partitioning(nn.initializers.lecun_normal(),
                                                          (None, None, "fan_in", "embed")),
                 bias_init=nn.with_logical_partitioning(nn.initializers.zeros, ("embed",)),
                 name=name)


def _group_norm(groups, name):
  return nn.GroupNorm(num_groups=groups, epsilon=1e-6, dtype=jnp.float32,
                      param_dtype=jnp.float32,
                      scale_init=nn.with_logical_partitioning(nn.initializers.ones, ("norm",)),
                      bias_init=nn.with_logical_partitioning(nn.initializers.zeros, ("norm",)),
                      name=name)


class ResnetBlock(nn.Module):
  features: int
  groups: int
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x):
    h = nn.silu(_group_norm(self.groups, "norm1")(x.astype(jnp.float32)))
    h = _conv(self.features, 3, self.dtype, "conv1")(h.astype(self.dtype))
    h = nn.silu(_group_norm(self.groups, "norm2")(h.astype(jnp.float32)))
    h = _conv(self.features, 3, self.dtype, "conv2")(h.astype(self.dtype))
    if x.shape[-1] != self.features:
      x = _conv(self.features, 1, self.dtype, "conv_shortcut")(x.astype(self.dtype))
    return x.astype(jnp.float32) + h.astype(jnp.float32)


class SpatialAttention(nn.Module):
  """One head over the H x W positions, GroupNorm first and the input added back."""
  groups: int
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x):
    batch, height, width, channels = x.shape
    h = _group_norm(self.groups, "group_norm")(x.astype(jnp.float32))
    h = h.reshape(batch, height * width, channels).astype(self.dtype)

    def proj(name):
      return nn.Dense(channels, dtype=self.dtype, param_dtype=jnp.float32,
                      kernel_init=nn.with_logical_partitioning(nn.initializers.lecun_normal(),
                                                               ("embed", "qkv")),
                      bias_init=nn.with_logical_partitioning(nn.initializers.zeros, ("qkv",)),
                      name=name)

    q, k, v = (proj(n)(h)[:, :, None, :] for n in ("to_q", "to_k", "to_v"))
    h = jax.nn.dot_product_attention(q, k, v).reshape(batch, height * width, channels)
    h = nn.Dense(channels, dtype=self.dtype, param_dtype=jnp.float32,
                 kernel_init=nn.with_logical_partitioning(nn.initializers.lecun_normal(),
                                                          ("heads", "embed")),
                 bias_init=nn.with_logical_partitioning(nn.initializers.zeros, ("embed",)),
                 name="to_out_0")(h)
    return x.astype(jnp.float32) + h.reshape(x.shape).astype(jnp.float32)


class MidBlock(nn.Module):
  groups: int
  attention: bool = True
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x):
    width = x.shape[-1]
    x = ResnetBlock(width, self.groups, self.dtype, name="resnets_0")(x)
    if self.attention:
      x = SpatialAttention(self.groups, self.dtype, name="attentions_0")(x)
    return ResnetBlock(width, self.groups, self.dtype, name="resnets_1")(x)


class Downsample(nn.Module):
  """A stride-2 3x3 conv after padding one row and column at the bottom and right."""
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x):
    x = jnp.pad(x, ((0, 0), (0, 1), (0, 1), (0, 0)))
    return _conv(x.shape[-1], 3, self.dtype, "conv", stride=2, padding="VALID")(
        x.astype(self.dtype)).astype(jnp.float32)


class Upsample(nn.Module):
  """Nearest-neighbour x2, then a 3x3 conv."""
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x):
    x = jnp.repeat(jnp.repeat(x, 2, axis=1), 2, axis=2)
    return _conv(x.shape[-1], 3, self.dtype, "conv")(x.astype(self.dtype)).astype(jnp.float32)


class Level(nn.Module):
  """`num_layers` ResNet blocks to `features`, then a down- or upsampling (or none)."""
  features: int
  num_layers: int
  groups: int
  resample: str = "none"  # "down", "up" or "none"
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x):
    for j in range(self.num_layers):
      x = ResnetBlock(self.features, self.groups, self.dtype, name=f"resnets_{j}")(x)
    if self.resample == "down":
      x = Downsample(self.dtype, name="downsamplers_0")(x)
    elif self.resample == "up":
      x = Upsample(self.dtype, name="upsamplers_0")(x)
    return x


class Encoder(nn.Module):
  block_out_channels: Sequence[int]
  layers_per_block: int
  latent_channels: int
  groups: int
  mid_block_attention: bool = True
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x):
    x = _conv(self.block_out_channels[0], 3, self.dtype, "conv_in")(x.astype(self.dtype))
    last = len(self.block_out_channels) - 1
    for i, width in enumerate(self.block_out_channels):
      x = Level(width, self.layers_per_block, self.groups, "down" if i < last else "none",
                self.dtype, name=f"down_blocks_{i}")(x)
    x = MidBlock(self.groups, self.mid_block_attention, self.dtype, name="mid_block")(x)
    x = nn.silu(_group_norm(self.groups, "conv_norm_out")(x.astype(jnp.float32)))
    return _conv(2 * self.latent_channels, 3, self.dtype, "conv_out")(
        x.astype(self.dtype)).astype(jnp.float32)


class Decoder(nn.Module):
  block_out_channels: Sequence[int]
  layers_per_block: int
  out_channels: int
  groups: int
  mid_block_attention: bool = True
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, z):
    widths = list(reversed(self.block_out_channels))
    x = _conv(widths[0], 3, self.dtype, "conv_in")(z.astype(self.dtype)).astype(jnp.float32)
    x = MidBlock(self.groups, self.mid_block_attention, self.dtype, name="mid_block")(x)
    last = len(widths) - 1
    for i, width in enumerate(widths):
      x = Level(width, self.layers_per_block + 1, self.groups, "up" if i < last else "none",
                self.dtype, name=f"up_blocks_{i}")(x)
    x = nn.silu(_group_norm(self.groups, "conv_norm_out")(x))
    return _conv(self.out_channels, 3, self.dtype, "conv_out")(
        x.astype(self.dtype)).astype(jnp.float32)


class AutoencoderKL(nn.Module):
  """The VAE; the defaults are sd-vae-ft-ema's (`SD_VAE`). Call a method with `method=`:
  `vae.apply(variables, images, method=vae.encode)`."""
  block_out_channels: Sequence[int] = SD_VAE["block_out_channels"]
  layers_per_block: int = SD_VAE["layers_per_block"]
  latent_channels: int = SD_VAE["latent_channels"]
  norm_num_groups: int = SD_VAE["norm_num_groups"]
  in_channels: int = SD_VAE["in_channels"]
  out_channels: int = SD_VAE["out_channels"]
  mid_block_attention: bool = SD_VAE["mid_block_attention"]
  scaling_factor: float = SD_VAE["scaling_factor"]
  dtype: Dtype = jnp.float32

  def setup(self):
    for width in self.block_out_channels:
      if width % self.norm_num_groups:
        raise ValueError(f"block_out_channels {tuple(self.block_out_channels)} must be "
                         f"divisible by norm_num_groups {self.norm_num_groups}")
    common = dict(block_out_channels=tuple(self.block_out_channels),
                  layers_per_block=self.layers_per_block, groups=self.norm_num_groups,
                  mid_block_attention=self.mid_block_attention, dtype=self.dtype)
    self.encoder = Encoder(latent_channels=self.latent_channels, **common)
    self.decoder = Decoder(out_channels=self.out_channels, **common)
    self.quant_conv = _conv(2 * self.latent_channels, 1, self.dtype, None)
    self.post_quant_conv = _conv(self.latent_channels, 1, self.dtype, None)

  def moments(self, images: jax.Array) -> tuple[jax.Array, jax.Array]:
    """The posterior's mean and log-variance (clipped to [-30, 20]), float32 NHWC."""
    h = self.quant_conv(self.encoder(images).astype(self.dtype)).astype(jnp.float32)
    mean, logvar = jnp.split(h, 2, axis=-1)
    return mean, jnp.clip(logvar, -30.0, 20.0)

  def encode(self, images: jax.Array) -> jax.Array:
    """The posterior mean of `images` [B, H, W, in_channels] in [-1, 1]."""
    return self.moments(images)[0]

  def encode_sample(self, images: jax.Array, rng: jax.Array) -> jax.Array:
    """A draw from the posterior: mean + exp(logvar / 2) * N(0, 1)."""
    mean, logvar = self.moments(images)
    return mean + jnp.exp(0.5 * logvar) * jax.random.normal(rng, mean.shape, mean.dtype)

  def decode(self, latents: jax.Array) -> jax.Array:
    """The image [B, 8H, 8W, out_channels] (for four levels) of `latents`, in [-1, 1]."""
    return self.decoder(self.post_quant_conv(latents.astype(self.dtype))).astype(jnp.float32)

  def to_model(self, images: jax.Array) -> jax.Array:
    """What a latent diffusion model is trained on: `scaling_factor` x the posterior mean."""
    return self.scaling_factor * self.encode(images)

  def from_model(self, latents: jax.Array) -> jax.Array:
    return self.decode(latents / self.scaling_factor)

  def __call__(self, images: jax.Array) -> jax.Array:
    """decode(encode(images)): the reconstruction (and what `init` builds every part from)."""
    return self.decode(self.encode(images))


def from_settings(path_or_dict) -> AutoencoderKL:
  """The VAE a converter's JSON (its path, or the record or its `settings` dict) describes."""
  settings = path_or_dict
  if isinstance(path_or_dict, str):
    with open(path_or_dict) as f:
      settings = json.load(f)
  settings = settings.get("settings", settings)
  unknown = sorted(set(settings) - set(SETTINGS))
  if unknown:
    raise ValueError(f"unknown VAE settings {unknown}; known: {list(SETTINGS)}")
  return AutoencoderKL(**{k: (tuple(v) if isinstance(v, list) else v)
                          for k, v in settings.items()})
