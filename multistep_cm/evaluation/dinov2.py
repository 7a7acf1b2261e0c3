"""DINOv2 ViT in Flax linen: the CLS feature of FD-DINOv2 (EDM2's second metric beside FID).

The network of Oquab et al. 2023 as the authors' torch hub code builds it
(`dinov2/models/vision_transformer.py`): a 14x14 patch embedding, a CLS token, learned
position embeddings for a 37x37 grid (518 px) interpolated to the input's grid, pre-norm
blocks with LayerScale on both branches (LayerNorm eps 1e-6, exact GELU MLP, or SwiGLU for
g/14), and a final LayerNorm whose CLS row is the feature. Sizes (`PRESETS`): S/14, B/14,
L/14 and g/14 with hidden 384/768/1024/1536, 12/12/24/40 blocks, 6/12/16/24 heads; the
registers variants are not supported. FD-DINOv2 uses L/14 (1024-d).

Position embeddings are resized by PyTorch's bicubic (A = -0.75, edge-clamped) at the scale
(grid + `interpolate_offset`) / 37: 0.1 is the torch hub model's (EDM2's detector), 0 the
HuggingFace `Dinov2Model`'s, which asks for the output size instead.

`preprocess` is EDM2's `DINOv2Detector` in its default ("torch") resize mode: uint8
pixels, PyTorch's antialiased bicubic resize (A = -0.5, PIL's filter) to 224x224, no
rounding or clipping after it, then /255 and ImageNet mean/std. Grey images are repeated
to RGB first (EDM2 sees RGB only). Variable names mirror the hub's modules
(`blocks_3/attn/qkv/kernel`), so `convert_dinov2` is a rename and transposes.
"""
import dataclasses
import functools
import math
import os
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from multistep_cm.evaluation import inception
from multistep_cm.evaluation import tree_io

INPUT_SIZE = 224
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
HUB_INTERPOLATE_OFFSET = 0.1
FD_PRESET = "L/14"
PREPROCESSING = ("EDM2 DINOv2Detector (torch mode): antialiased bicubic resize to 224x224, "
                 "/255, ImageNet mean/std")
CONVERT_COMMAND = ("python -m multistep_cm.evaluation.convert_dinov2 "
                   "--src=dinov2_vitl14_pretrain.pth --out=dinov2_vitl14.npz")
_HIGHEST = jax.lax.Precision.HIGHEST


@dataclasses.dataclass(frozen=True)
class Dinov2Config:
  """One ViT's shape. `mlp_hidden` is the MLP's width (SwiGLU: each of its two halves)."""
  hidden: int
  layers: int
  heads: int
  mlp_hidden: int
  swiglu: bool = False
  patch: int = 14
  pos_grid: int = 37  # the position embeddings' grid: 518 px / 14
  interpolate_offset: float = HUB_INTERPOLATE_OFFSET

  def to_dict(self) -> dict[str, Any]:
    return dataclasses.asdict(self)


def swiglu_hidden(hidden: int, mlp_ratio: float = 4.0) -> int:
  """The hub's SwiGLU width: two thirds of the MLP's, rounded up to a multiple of 8."""
  return (int(int(hidden * mlp_ratio) * 2 / 3) + 7) // 8 * 8


PRESETS = {
    "S/14": Dinov2Config(384, 12, 6, 4 * 384),
    "B/14": Dinov2Config(768, 12, 12, 4 * 768),
    "L/14": Dinov2Config(1024, 24, 16, 4 * 1024),
    "g/14": Dinov2Config(1536, 40, 24, swiglu_hidden(1536), swiglu=True),
}


def network_name(config: Dinov2Config) -> str:
  """The name statistics files and reports carry: size, feature, position interpolation."""
  size = next((k for k, v in PRESETS.items()
               if dataclasses.replace(v, interpolate_offset=config.interpolate_offset)
               == config), f"{config.hidden}d-{config.layers}x/{config.patch}")
  return (f"DINOv2 ViT-{size} (CLS after the final LayerNorm, position embeddings bicubic "
          f"offset {config.interpolate_offset:g})")


# --- Resampling matrices ------------------------------------------------------------------------


def _cubic(x: np.ndarray, a: float) -> np.ndarray:
  """Keys' cubic convolution kernel with parameter `a`."""
  x = np.abs(x)
  near = ((a + 2) * x - (a + 3)) * x * x + 1
  far = ((a * x - 5 * a) * x + 8 * a) * x - 4 * a
  return np.where(x <= 1, near, np.where(x < 2, far, 0.0))


def bicubic_matrix(size_in: int, size_out: int, scale_factor: float | None = None) -> np.ndarray:
  """[size_out, size_in] weights of PyTorch's `interpolate(mode="bicubic",
  align_corners=False)` along one axis (A = -0.75, taps clamped to the edge); with
  `scale_factor` the source position is (i + 0.5) / scale_factor - 0.5, as when PyTorch is
  given a scale rather than a size."""
  step = 1.0 / scale_factor if scale_factor else size_in / size_out
  src = (np.arange(size_out) + 0.5) * step - 0.5
  base = np.floor(src)
  t = src - base
  weights = np.zeros((size_out, size_in))
  for tap in range(-1, 3):
    index = np.clip(base + tap, 0, size_in - 1).astype(int)
    np.add.at(weights, (np.arange(size_out), index), _cubic(t - tap, -0.75))
  return weights


def antialiased_bicubic_matrix(size_in: int, size_out: int) -> np.ndarray:
  """[size_out, size_in] weights of PyTorch's `interpolate(mode="bicubic", antialias=True)`
  along one axis: PIL's filter (A = -0.5) stretched by the scale when shrinking, over the
  taps inside the image, normalised to sum to one."""
  scale = size_in / size_out
  stretch = max(scale, 1.0)
  support = 2.0 * stretch
  weights = np.zeros((size_out, size_in))
  for i in range(size_out):
    centre = scale * (i + 0.5)
    lo = max(int(centre - support + 0.5), 0)
    hi = min(int(centre + support + 0.5), size_in)
    taps = np.arange(lo, hi)
    w = _cubic((taps - centre + 0.5) / stretch, -0.5)
    weights[i, lo:hi] = w / w.sum() if w.sum() != 0 else w
  return weights


def _resize_2d(x, rows: np.ndarray, cols: np.ndarray):
  """[N, H, W, C] -> [N, H', W', C] by separable weights (float32, full precision)."""
  return jnp.einsum("yh,nhwc,xw->nyxc", jnp.asarray(rows, jnp.float32), x,
                    jnp.asarray(cols, jnp.float32), precision=_HIGHEST)


def preprocess(images, quantize: bool = True):
  """uint8 [N, H, W, C] (or float [-1, 1], rounded to 8 bits by default) -> the network's
  input, float32 [N, 224, 224, 3], as EDM2's FD-DINOv2 detector prepares it."""
  if images.ndim != 4 or images.shape[-1] not in (1, 3):
    raise ValueError(f"images must be [N, H, W, 1 or 3], got shape {images.shape}")
  x = inception.to_pixels(jnp.asarray(images), quantize)
  if x.shape[-1] == 1:
    x = jnp.repeat(x, 3, axis=-1)
  _, h, w, _ = x.shape
  if (h, w) != (INPUT_SIZE, INPUT_SIZE):
    x = _resize_2d(x, antialiased_bicubic_matrix(h, INPUT_SIZE),
                   antialiased_bicubic_matrix(w, INPUT_SIZE))
  return (x / 255.0 - jnp.asarray(IMAGENET_MEAN)) / jnp.asarray(IMAGENET_STD)


# --- The network --------------------------------------------------------------------------------


class LayerScale(nn.Module):
  """x * gamma, one learned factor per channel."""

  @nn.compact
  def __call__(self, x):
    return x * self.param("gamma", nn.initializers.ones, (x.shape[-1],))


class Attention(nn.Module):
  """Multi-head self-attention with one fused q|k|v projection, as the hub's `attn.qkv`."""
  heads: int

  @nn.compact
  def __call__(self, x):
    n, t, d = x.shape
    qkv = nn.Dense(3 * d, precision=_HIGHEST, name="qkv")(x).reshape(n, t, 3, self.heads, -1)
    q, k, v = qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2]
    logits = jnp.einsum("nqhd,nkhd->nhqk", q, k, precision=_HIGHEST) / math.sqrt(q.shape[-1])
    weights = jax.nn.softmax(logits.astype(jnp.float32), axis=-1).astype(v.dtype)
    out = jnp.einsum("nhqk,nkhd->nqhd", weights, v, precision=_HIGHEST).reshape(n, t, d)
    return nn.Dense(d, precision=_HIGHEST, name="proj")(out)


class Mlp(nn.Module):
  """fc1, exact GELU, fc2; or with `swiglu`, w12 = [gate | up], silu(gate) * up, w3."""
  hidden: int
  swiglu: bool

  @nn.compact
  def __call__(self, x):
    d = x.shape[-1]
    if self.swiglu:
      gate, up = jnp.split(nn.Dense(2 * self.hidden, precision=_HIGHEST, name="w12")(x), 2, -1)
      return nn.Dense(d, precision=_HIGHEST, name="w3")(jax.nn.silu(gate) * up)
    h = jax.nn.gelu(nn.Dense(self.hidden, precision=_HIGHEST, name="fc1")(x), approximate=False)
    return nn.Dense(d, precision=_HIGHEST, name="fc2")(h)


class Block(nn.Module):
  """Pre-norm transformer block with LayerScale on the attention and MLP branches."""
  config: Dinov2Config

  @nn.compact
  def __call__(self, x):
    c = self.config
    x = x + LayerScale(name="ls1")(Attention(c.heads, name="attn")(
        nn.LayerNorm(1e-6, name="norm1")(x)))
    return x + LayerScale(name="ls2")(Mlp(c.mlp_hidden, c.swiglu, name="mlp")(
        nn.LayerNorm(1e-6, name="norm2")(x)))


class DinoV2(nn.Module):
  """`__call__(x)` with x from `preprocess`, [N, H, W, 3] (H, W multiples of the patch) ->
  the CLS row of the final LayerNorm, [N, hidden]."""
  config: Dinov2Config

  def position_embeddings(self, pos_embed, grid_h: int, grid_w: int):
    """[1, 1 + G*G, D] -> [1, 1 + grid_h*grid_w, D], as the hub's `interpolate_pos_encoding`
    (unchanged when the grid is already G x G)."""
    g = self.config.pos_grid
    if (grid_h, grid_w) == (g, g):
      return pos_embed
    offset = self.config.interpolate_offset
    rows = bicubic_matrix(g, grid_h, (grid_h + offset) / g if offset else None)
    cols = bicubic_matrix(g, grid_w, (grid_w + offset) / g if offset else None)
    patches = pos_embed[:, 1:].reshape(1, g, g, -1).astype(jnp.float32)
    patches = _resize_2d(patches, rows, cols).reshape(1, grid_h * grid_w, -1)
    return jnp.concatenate([pos_embed[:, :1], patches.astype(pos_embed.dtype)], axis=1)

  @nn.compact
  def __call__(self, x):
    c = self.config
    if x.shape[1] % c.patch or x.shape[2] % c.patch:
      raise ValueError(f"input {x.shape[1]}x{x.shape[2]} is not a multiple of the patch "
                       f"{c.patch}")
    x = nn.Conv(c.hidden, (c.patch, c.patch), strides=c.patch, padding="VALID",
                precision=_HIGHEST, name="patch_embed")(x)
    n, gh, gw, d = x.shape
    cls = self.param("cls_token", nn.initializers.normal(1e-6), (1, 1, d))
    pos = self.param("pos_embed", nn.initializers.normal(0.02), (1, 1 + c.pos_grid ** 2, d))
    x = jnp.concatenate([jnp.broadcast_to(cls, (n, 1, d)), x.reshape(n, gh * gw, d)], axis=1)
    x = x + self.position_embeddings(pos, gh, gw)
    for i in range(c.layers):
      x = Block(c, name=f"blocks_{i}")(x)
    return nn.LayerNorm(1e-6, name="norm")(x)[:, 0]


# --- Parameters ---------------------------------------------------------------------------------


@functools.lru_cache(maxsize=None)
def variable_shapes(config: Dinov2Config) -> dict[str, tuple[int, ...]]:
  """{"params/blocks_0/attn/qkv/kernel": shape, ...} for every variable of `config`'s net."""
  size = config.patch * config.pos_grid
  abstract = jax.eval_shape(DinoV2(config).init, jax.random.key(0),
                            jax.ShapeDtypeStruct((1, size, size, 3), jnp.float32))
  return {"/".join(str(k.key) for k in path): tuple(leaf.shape)
          for path, leaf in jax.tree_util.tree_leaves_with_path(abstract)}


def random_variables(config: Dinov2Config, seed: int = 0) -> dict[str, Any]:
  """Random variables of the right shapes, drawn with numpy: for tests, never for a metric.

  Dense kernels are N(0, 1/fan_in), LayerScale 1, norms 1 and 0, so features stay finite.
  """
  rng = np.random.default_rng(seed)
  flat = {}
  for path, shape in variable_shapes(config).items():
    leaf = path.rsplit("/", 1)[-1]
    if leaf == "kernel":
      flat[path] = rng.normal(0, 1 / np.sqrt(np.prod(shape[:-1])), shape)
    elif leaf in ("scale", "gamma"):
      flat[path] = np.ones(shape)
    elif leaf == "bias":
      flat[path] = np.zeros(shape)
    else:  # cls_token, pos_embed
      flat[path] = rng.normal(0, 0.02, shape)
  return tree_io.unflatten({k: v.astype(np.float32) for k, v in flat.items()})


def check_variables(flat: dict[str, np.ndarray], config: Dinov2Config, source: str):
  """Raises ValueError unless `flat` has exactly `config`'s variable names and shapes."""
  expected = variable_shapes(config)
  missing = sorted(set(expected) - set(flat))
  extra = sorted(set(flat) - set(expected))
  wrong = [f"{k}: {flat[k].shape} != {expected[k]}" for k in sorted(set(expected) & set(flat))
           if tuple(flat[k].shape) != expected[k]]
  if missing or extra or wrong:
    details = [f"missing {missing[:5]}" * bool(missing), f"unexpected {extra[:5]}" * bool(extra),
               ", ".join(wrong[:5])]
    raise ValueError(f"{source} does not match DINOv2 {config}: "
                     + "; ".join(d for d in details if d))


def missing_weights_message(path: str) -> str:
  return (f"DINOv2 weights not found at {path!r}. This code never downloads them: fetch the "
          "published PyTorch weights yourself (the torch hub's dinov2_vitl14_pretrain.pth, or "
          "HuggingFace facebook/dinov2-large's model.safetensors), then convert them once: "
          f"{CONVERT_COMMAND}")


def load_dinov2(path: str) -> tuple[Dinov2Config, dict[str, Any]]:
  """(config, variables) from a file written by `convert_dinov2`.

  Raises:
    FileNotFoundError: `path` does not exist; the message says where the weights come from.
    ValueError: the file is not a converted DINOv2, or its arrays do not fit its config.
  """
  path = os.path.expanduser(path)
  if not os.path.exists(path):
    raise FileNotFoundError(missing_weights_message(path))
  tree, metadata = tree_io.load(path)
  if "dinov2_config" not in metadata:
    raise ValueError(f"{path} is not a converted DINOv2 (no dinov2_config in its metadata; "
                     f"network {metadata.get('network')!r}): {CONVERT_COMMAND}")
  config = Dinov2Config(**metadata["dinov2_config"])
  flat = tree_io.flatten(tree)
  check_variables(flat, config, path)
  return config, tree_io.unflatten({k: v.astype(np.float32) for k, v in flat.items()})


def save_dinov2(path: str, config: Dinov2Config, variables, **metadata):
  """Writes `variables` of `config`'s network where `load_dinov2` reads them, with the
  network's name, its config and the weights' digest (and `metadata`, e.g. the source)."""
  tree_io.save(path, variables, {"network": network_name(config),
                                 "dinov2_config": config.to_dict(),
                                 "weights_sha256": variables_digest(variables), **metadata})


def variables_digest(variables) -> str:
  """The weights' name in reports and statistics files: `tree_io.digest`."""
  return tree_io.digest(variables)


def features(config: Dinov2Config, variables, images, quantize: bool = True
             ) -> dict[str, jax.Array]:
  """images -> {"features": [N, hidden]}: pure and jittable, the shape `fid.compute_stats`
  expects of its `apply_fn` (bind `config` with partial)."""
  return {"features": DinoV2(config).apply(variables, preprocess(images, quantize))}
