"""EDM's ADM UNet (Karras et al. 2022's `DhariwalUNet` with `EDMPrecond`) in Flax: the
ImageNet-64 teacher of the consistency-model literature (`edm-imagenet-64x64-cond-adm`).

The network is written from the EDM paper's architecture and its published code's
structure. Its parameters carry the names of EDM's state dict, so converting published
weights is a rename and a transpose (`params_from_state_dict`):

* `model.enc.64x64_block0.conv0.weight` `[O, I, kh, kw]` becomes
  `model/enc_64x64_block0/conv0/kernel` `[kh, kw, I, O]`;
* a linear layer's `weight` `[O, I]` becomes `kernel` `[I, O]`;
* a GroupNorm's `weight` becomes `scale`;
* the fixed resampling filters (buffers, not parameters) are dropped.

Blocks (EDM's `UNetBlock` as ADM uses it):

* GroupNorm with min(32, C/4) groups and eps 1e-5, SiLU, a 3x3 convolution;
* the embedding's adaptive scale and shift;
* dropout, then a 3x3 convolution;
* the shortcut: a 1x1 convolution where the width changes, else the input resampled;
* multi-head self-attention with 64 channels per head where the resolution is listed;
* down- and upsampling by 2x2 averaging and nearest-neighbour repetition (the [1, 1]
  filter).

The noise embedding is sinusoidal (cos then sin, max period 10^4) of c_noise = log(σ)/4. A
class enters as a one-hot vector through a linear map, and the null class `label_dim` is the
zero vector, as for EDM's label dropout.

`EDMTeacher` adds EDM's preconditioning, D(x; σ) = c_skip x + c_out F(c_in x, c_noise) with
σ_data = 0.5. It is called as `teacher(x_ve, sigma, labels)` with int class labels, the
call `config.teacher` takes for `frame='ve', prediction='x'` (docs/teachers.md). The
factories `edm_imagenet64_cond` and `edm_imagenet64_cond_bf16_remat` build it. Every
weight's output-channel axis is the logical 'embed' axis, so the network shards FSDP-style
like our own (models/partitioning.py). Every size is a
constructor argument (the tests use tiny ones), as are the compute dtype (`dtype`,
float32 or bfloat16) and remat.
"""
import functools
import re
import math
from typing import Any, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

SIGMA_DATA = 0.5


def _sharded(ndim: int):
  """An initialiser whose output-channel axis (the last) is the logical 'embed' axis, so the
  weights shard FSDP-style over the mesh's 'fsdp' axis (models/partitioning.py)."""
  init = nn.initializers.lecun_normal() if ndim > 1 else nn.initializers.zeros
  return nn.with_logical_partitioning(init, (None,) * (ndim - 1) + ("embed",))


def _group_norm(channels: int, name: str) -> nn.GroupNorm:
  return nn.GroupNorm(num_groups=min(32, channels // 4), epsilon=1e-5, dtype=jnp.float32,
                      param_dtype=jnp.float32, name=name)


def _resample(x, up: bool, down: bool):
  """EDM's [1, 1] filter: 2x2 averaging down, nearest-neighbour repetition up (NHWC)."""
  if down:
    b, h, w, c = x.shape
    return x.reshape(b, h // 2, 2, w // 2, 2, c).mean(axis=(2, 4))
  if up:
    return jnp.repeat(jnp.repeat(x, 2, axis=1), 2, axis=2)
  return x


class Conv(nn.Module):
  """EDM's `Conv2d`: optional resampling, then a `kernel` x `kernel` convolution (none for
  kernel 0), 'SAME' padding."""
  features: int
  kernel: int
  up: bool = False
  down: bool = False
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x):
    x = _resample(x, self.up, self.down)
    if not self.kernel:
      return x
    k = self.kernel
    return nn.Conv(self.features, (k, k), padding=[(k // 2, k // 2)] * 2, dtype=self.dtype,
                   param_dtype=jnp.float32, kernel_init=_sharded(4), bias_init=_sharded(1),
                   name="conv")(x.astype(self.dtype))


class Block(nn.Module):
  """EDM's `UNetBlock` with ADM's settings (adaptive scale, skip scale 1)."""
  out_channels: int
  up: bool = False
  down: bool = False
  attention: bool = False
  channels_per_head: int = 64
  dropout: float = 0.0
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x, emb, train: bool = False):
    in_channels = x.shape[-1]
    c = self.out_channels
    dense = functools.partial(nn.Dense, dtype=self.dtype, param_dtype=jnp.float32,
                              kernel_init=_sharded(2), bias_init=_sharded(1))
    orig = x
    h = nn.silu(_group_norm(in_channels, "norm0")(x))
    h = Conv(c, 3, self.up, self.down, self.dtype, name="conv0")(h)
    scale, shift = jnp.split(dense(2 * c, name="affine")(emb).astype(jnp.float32), 2, axis=-1)
    h = _group_norm(c, "norm1")(h) * (scale[:, None, None, :] + 1) + shift[:, None, None, :]
    h = nn.Dropout(self.dropout, deterministic=not train)(nn.silu(h))
    h = Conv(c, 3, dtype=self.dtype, name="conv1")(h).astype(jnp.float32)
    if c != in_channels or self.up or self.down:
      kernel = 1 if c != in_channels else 0
      orig = Conv(c, kernel, self.up, self.down, self.dtype, name="skip")(orig)
    x = h + orig.astype(jnp.float32)
    heads = c // self.channels_per_head if self.attention else 0
    if heads:  # as EDM: a block narrower than one head has no attention
      b, hh, ww, _ = x.shape
      qkv = Conv(3 * c, 1, dtype=self.dtype, name="qkv")(_group_norm(c, "norm2")(x))
      # EDM's channel layout: [heads, C / heads, (q, k, v)].
      qkv = qkv.astype(jnp.float32).reshape(b, hh * ww, heads, c // heads, 3)
      q, k, v = qkv[..., 0], qkv[..., 1], qkv[..., 2]
      logits = jnp.einsum("bqhc,bkhc->bhqk", q, k) / math.sqrt(c // heads)
      weights = jax.nn.softmax(logits, axis=-1)
      a = jnp.einsum("bhqk,bkhc->bqhc", weights, v).reshape(b, hh, ww, c)
      x = x + Conv(c, 1, dtype=self.dtype, name="proj")(a).astype(jnp.float32)
    return x


def noise_embedding(noise_labels, channels: int, max_positions: float = 10000.0):
  """EDM's `PositionalEmbedding`: [cos, sin] of the labels times max_positions^(-i / (C/2))."""
  half = channels // 2
  freqs = (1.0 / max_positions) ** (jnp.arange(half, dtype=jnp.float32) / half)
  angles = noise_labels.astype(jnp.float32)[:, None] * freqs[None, :]
  return jnp.concatenate([jnp.cos(angles), jnp.sin(angles)], axis=-1)


class ADMUNet(nn.Module):
  """EDM's `DhariwalUNet`: `net(x, noise_labels, class_labels)`, x NHWC, class labels one-hot
  `[B, label_dim]` (or None)."""
  img_resolution: int
  in_channels: int
  out_channels: int
  label_dim: int = 0
  model_channels: int = 192
  channel_mult: Sequence[int] = (1, 2, 3, 4)
  channel_mult_emb: int = 4
  num_blocks: int = 3
  attn_resolutions: Sequence[int] = (32, 16, 8)
  dropout: float = 0.1
  dtype: Any = jnp.float32
  remat: bool = False

  def _blocks(self):
    """`(name, kind, out channels, up, down, attention)` of the encoder's and the decoder's
    layers in EDM's order; a decoder block of kind 'concat' takes the next skip first."""
    enc, dec = [], []
    cout = self.in_channels
    for level, mult in enumerate(self.channel_mult):
      res = self.img_resolution >> level
      if level == 0:
        cout = self.model_channels * mult
        enc.append((f"enc_{res}x{res}_conv", "conv", cout, False, False, False))
      else:
        enc.append((f"enc_{res}x{res}_down", "block", cout, False, True, False))
      for idx in range(self.num_blocks):
        cout = self.model_channels * mult
        enc.append((f"enc_{res}x{res}_block{idx}", "block", cout, False, False,
                    res in self.attn_resolutions))
    for level, mult in reversed(list(enumerate(self.channel_mult))):
      res = self.img_resolution >> level
      if level == len(self.channel_mult) - 1:
        dec.append((f"dec_{res}x{res}_in0", "block", cout, False, False, True))
        dec.append((f"dec_{res}x{res}_in1", "block", cout, False, False, False))
      else:
        dec.append((f"dec_{res}x{res}_up", "block", cout, True, False, False))
      for idx in range(self.num_blocks + 1):
        cout = self.model_channels * mult
        dec.append((f"dec_{res}x{res}_block{idx}", "concat", cout, False, False,
                    res in self.attn_resolutions))
    return enc, dec

  @nn.compact
  def __call__(self, x, noise_labels, class_labels=None, train: bool = False):
    emb_channels = self.model_channels * self.channel_mult_emb
    dense = functools.partial(nn.Dense, dtype=self.dtype, param_dtype=jnp.float32,
                              kernel_init=_sharded(2), bias_init=_sharded(1))
    emb = noise_embedding(noise_labels, self.model_channels)
    emb = nn.silu(dense(emb_channels, name="map_layer0")(emb))
    emb = dense(emb_channels, name="map_layer1")(emb).astype(jnp.float32)
    if self.label_dim:
      labels = (jnp.zeros((x.shape[0], self.label_dim), jnp.float32) if class_labels is None
                else class_labels.astype(jnp.float32))
      emb = emb + dense(emb_channels, use_bias=False, name="map_label")(labels)
    emb = nn.silu(emb.astype(jnp.float32))
    block_cls = nn.remat(Block, static_argnums=(3,)) if self.remat else Block
    enc, dec = self._blocks()
    skips = []
    x = x.astype(jnp.float32)
    for name, kind, cout, up, down, attention in enc:
      if kind == "conv":
        x = Conv(cout, 3, dtype=self.dtype, name=name)(x).astype(jnp.float32)
      else:
        x = block_cls(cout, up, down, attention, dropout=self.dropout, dtype=self.dtype,
                      name=name)(x, emb, train)
      skips.append(x)
    for name, kind, cout, up, down, attention in dec:
      if kind == "concat":
        x = jnp.concatenate([x, skips.pop()], axis=-1)
      x = block_cls(cout, up, down, attention, dropout=self.dropout, dtype=self.dtype,
                    name=name)(x, emb, train)
    x = nn.silu(_group_norm(x.shape[-1], "out_norm")(x))
    return Conv(self.out_channels, 3, dtype=self.dtype, name="out_conv")(x).astype(jnp.float32)


class EDMTeacher(nn.Module):
  """EDM's preconditioned denoiser D(x; σ): `teacher(x_ve, sigma, labels)` with int class
  labels `[B]` (the null class `label_dim` and None are unconditional), x NHWC in EDM's VE
  frame, sigma `[B]`."""
  model: ADMUNet
  sigma_data: float = SIGMA_DATA

  def __call__(self, x, sigma, labels=None, train: bool = False):
    x = x.astype(jnp.float32)
    sigma = jnp.broadcast_to(jnp.asarray(sigma, jnp.float32), x.shape[:1])
    s = sigma[:, None, None, None]
    sd2 = self.sigma_data ** 2
    c_skip = sd2 / (s ** 2 + sd2)
    c_out = s * self.sigma_data / jnp.sqrt(s ** 2 + sd2)
    c_in = 1.0 / jnp.sqrt(sd2 + s ** 2)
    one_hot = None
    if self.model.label_dim and labels is not None:
      # The null class (index label_dim) is the zero vector, which jax.nn.one_hot gives.
      one_hot = jax.nn.one_hot(jnp.asarray(labels, jnp.int32), self.model.label_dim)
    f_x = self.model(c_in * x, jnp.log(sigma) / 4.0, one_hot, train)
    return c_skip * x + c_out * f_x


def edm_imagenet64_cond(dtype: Any = jnp.float32, remat: bool = False) -> EDMTeacher:
  """`edm-imagenet-64x64-cond-adm`: 64x64x3, 1000 classes, 192 channels, multipliers
  1-2-3-4, 3 blocks per level, attention at 32, 16, 8, dropout 0.1 (295.9M parameters)."""
  return EDMTeacher(ADMUNet(img_resolution=64, in_channels=3, out_channels=3, label_dim=1000,
                            dtype=dtype, remat=remat))


def edm_imagenet64_cond_bf16_remat() -> EDMTeacher:
  """The same network computing in bfloat16 (parameters, norms and softmax in float32), its
  blocks rematerialised: for training a student of it on accelerators."""
  return edm_imagenet64_cond(jnp.bfloat16, remat=True)


def edm_digits_8px() -> EDMTeacher:
  """A small ADM UNet with EDM's preconditioning for the embedded 8x8 digits (10 classes):
  32 channels, multipliers 1-2, 2 blocks a level, attention at 4x4, no dropout; trained
  here as a teacher by `configs/digits_pipeline.py:arch=adm`."""
  return EDMTeacher(ADMUNet(img_resolution=8, in_channels=1, out_channels=1, label_dim=10,
                            model_channels=32, channel_mult=(1, 2), channel_mult_emb=4,
                            num_blocks=2, attn_resolutions=(4,), dropout=0.0))


# --- converting EDM's state dict ------------------------------------------------------------


_NORMS = ("norm0", "norm1", "norm2", "out_norm")
_LINEARS = ("map_layer0", "map_layer1", "map_label", "affine")


def _flax_path(parts: list[str], value: np.ndarray) -> tuple[list[str], np.ndarray]:
  """The Flax path and array of one EDM parameter `<module path>.<weight|bias>`: a GroupNorm's
  weight is its `scale`; a linear layer's `[O, I]` weight the kernel `[I, O]`; a
  convolution's `[O, I, kh, kw]` weight the kernel `[kh, kw, I, O]` of the `conv` inside
  our `Conv`."""
  *where, leaf = parts
  module = where[-1]
  if module in _NORMS:
    return where + ["scale" if leaf == "weight" else "bias"], value
  if module in _LINEARS:
    return where + ["kernel" if leaf == "weight" else "bias"], (
        value.T if leaf == "weight" else value)
  if leaf == "weight":
    if value.ndim != 4:
      raise ValueError(f"{'.'.join(parts)!r} has shape {value.shape}, not a convolution's")
    return where + ["conv", "kernel"], value.transpose(2, 3, 1, 0)
  return where + ["conv", "bias"], value


def params_from_state_dict(state_dict: dict[str, Any]) -> dict:
  """EDMTeacher's parameters from EDM's `EDMPrecond` state dict (`model.` prefixed, or the
  bare `DhariwalUNet`'s), as a nested dict of float32 numpy arrays.

  Raises:
    ValueError: a key that is not an ADM UNet parameter (one line naming it).
  """
  out: dict = {}
  for key, value in state_dict.items():
    value = np.asarray(value, np.float32)
    parts = key.split(".")
    if parts[0] == "model":
      parts = parts[1:]
    if parts[-1] == "resample_filter":
      continue  # EDM's fixed [1, 1] filters: buffers, not parameters
    if parts[0] in ("enc", "dec") and len(parts) >= 3:
      parts = [f"{parts[0]}_{parts[1]}"] + parts[2:]
    if len(parts) < 2 or parts[-1] not in ("weight", "bias"):
      raise ValueError(f"{key!r} is not a parameter of EDM's ADM UNet")
    path, array = _flax_path(parts, value)
    node = out.setdefault("model", {})
    for part in path[:-1]:
      node = node.setdefault(part, {})
    node[path[-1]] = array
  return out


# The published `edm-imagenet-64x64-cond-adm`'s settings (what `edm_imagenet64_cond` builds).
IMAGENET64_COND = dict(img_resolution=64, in_channels=3, out_channels=3, label_dim=1000,
                       model_channels=192, channel_mult=(1, 2, 3, 4), channel_mult_emb=4,
                       num_blocks=3, attn_resolutions=(32, 16, 8))


def settings_from_state_dict(state_dict: dict[str, Any]) -> dict[str, Any]:
  """The `ADMUNet` settings an EDM state dict's arrays imply (all but dropout, which a
  checkpoint does not record).

  Raises:
    ValueError: the keys are not an ADM UNet's (one line naming what is missing).
  """
  sd = {k.removeprefix("model."): v for k, v in state_dict.items()}
  first = [k for k in sd if re.fullmatch(r"enc\.\d+x\d+_conv\.weight", k)]
  if len(first) != 1 or "map_layer0.weight" not in sd or "out_conv.weight" not in sd:
    raise ValueError("not an EDM ADM UNet state dict: it needs enc.<R>x<R>_conv.weight, "
                     "map_layer0.weight and out_conv.weight")
  resolution = int(first[0].split(".")[1].split("x")[0])
  model_channels = int(np.shape(sd["map_layer0.weight"])[1])
  levels = sorted({int(m.group(1)) for k in sd
                   if (m := re.match(r"enc\.(\d+)x\d+_", k))}, reverse=True)
  mult, attention, blocks = [], [], 0
  for res in levels:
    pattern = rf"enc\.{res}x{res}_block(\d+)\."
    names = sorted({m.group(1) for k in sd if (m := re.match(pattern, k))})
    blocks = len(names)
    width = int(np.shape(sd[f"enc.{res}x{res}_block0.conv0.weight"])[0]) if names else 0
    mult.append(width // model_channels)
    if any(k.startswith(f"enc.{res}x{res}_block0.qkv.") for k in sd):
      attention.append(res)
  labels = sd.get("map_label.weight")
  return dict(img_resolution=resolution,
              in_channels=int(np.shape(sd[first[0]])[1]),
              out_channels=int(np.shape(sd["out_conv.weight"])[0]),
              label_dim=0 if labels is None else int(np.shape(labels)[1]),
              model_channels=model_channels, channel_mult=tuple(mult),
              channel_mult_emb=int(np.shape(sd["map_layer0.weight"])[0]) // model_channels,
              num_blocks=blocks, attn_resolutions=tuple(attention))
