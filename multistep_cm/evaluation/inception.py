"""The InceptionV3 of standard FID, in Flax linen: pool3 features and 1008 logits.

FID numbers are only comparable when computed with one network: the TensorFlow
graph `inception-2015-12-05` used by the original FID code (TTUR), the ADM
evaluator and clean-fid's `legacy_tensorflow` mode. pytorch-fid ships the same
weights as `pt_inception-2015-12-05-6726825d.pth` and documents where that graph
differs from torchvision's InceptionV3; this module follows it:
  * every conv is conv (no bias) + batch norm (eps 1e-3) + ReLU;
  * the 3x3 average pools inside Mixed_5b..5d, 6b..6e and 7b divide by the
    number of real pixels (`count_include_pad=False`), as TensorFlow does;
  * the last block, Mixed_7c, pools with a 3x3 max pool, not an average;
  * the classifier has 1008 outputs (the 2015 graph's class list), no aux head.
`pool3` is the 2048-d global average of Mixed_7c: the features of FID.

The network takes [N, 299, 299, 3] images already scaled by `preprocess`.
Parameters are variables {"params", "batch_stats"} with names mirroring the
PyTorch modules (`Mixed_6b/branch7x7_2/conv/kernel`), so the conversion in
`convert_inception` is a rename and a transpose.
"""
import functools
import os
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from multistep_cm.evaluation import tree_io

INPUT_SIZE = 299
POOL3_DIM = 2048
NUM_LOGITS = 1008
# The name reports and statistics files carry, so a reader knows which network measured them.
NETWORK_NAME = "inception-2015-12-05 (FID InceptionV3, pool3)"
# pytorch-fid's release of the TF FID graph's weights; its hash suffix is part of the name.
TORCH_WEIGHTS_NAME = "pt_inception-2015-12-05-6726825d.pth"
TORCH_WEIGHTS_URL = (
    "https://github.com/mseitzer/pytorch-fid/releases/download/fid_weights/" + TORCH_WEIGHTS_NAME)
CONVERT_COMMAND = (
    f"python -m multistep_cm.evaluation.convert_inception --src={TORCH_WEIGHTS_NAME} "
    "--out=inception_fid.npz")
RESIZE_MODES = ("tf1", "pytorch_fid")

Padding = tuple[int, int]


class ConvBN(nn.Module):
  """Conv without bias, inference batch norm, ReLU: torchvision's `BasicConv2d`."""
  features: int
  kernel: tuple[int, int]
  strides: int = 1
  padding: Padding = (0, 0)

  @nn.compact
  def __call__(self, x):
    ph, pw = self.padding
    x = nn.Conv(self.features, self.kernel, strides=self.strides,
                padding=((ph, ph), (pw, pw)), use_bias=False, name="conv")(x)
    x = nn.BatchNorm(use_running_average=True, epsilon=1e-3, name="bn")(x)
    return nn.relu(x)


def _avg_pool_same(x):
  # TensorFlow's SAME average pool divides by the in-image pixel count only.
  return nn.avg_pool(x, (3, 3), strides=(1, 1), padding=((1, 1), (1, 1)),
                     count_include_pad=False)


def _max_pool(x, strides: int, pad: int = 0):
  return nn.max_pool(x, (3, 3), strides=(strides, strides), padding=((pad, pad), (pad, pad)))


class InceptionA(nn.Module):
  """Mixed_5b..5d (35x35)."""
  pool_features: int

  @nn.compact
  def __call__(self, x):
    b1 = ConvBN(64, (1, 1), name="branch1x1")(x)
    b5 = ConvBN(48, (1, 1), name="branch5x5_1")(x)
    b5 = ConvBN(64, (5, 5), padding=(2, 2), name="branch5x5_2")(b5)
    b3 = ConvBN(64, (1, 1), name="branch3x3dbl_1")(x)
    b3 = ConvBN(96, (3, 3), padding=(1, 1), name="branch3x3dbl_2")(b3)
    b3 = ConvBN(96, (3, 3), padding=(1, 1), name="branch3x3dbl_3")(b3)
    bp = ConvBN(self.pool_features, (1, 1), name="branch_pool")(_avg_pool_same(x))
    return jnp.concatenate([b1, b5, b3, bp], axis=-1)


class InceptionB(nn.Module):
  """Mixed_6a: 35x35 -> 17x17."""

  @nn.compact
  def __call__(self, x):
    b3 = ConvBN(384, (3, 3), strides=2, name="branch3x3")(x)
    bd = ConvBN(64, (1, 1), name="branch3x3dbl_1")(x)
    bd = ConvBN(96, (3, 3), padding=(1, 1), name="branch3x3dbl_2")(bd)
    bd = ConvBN(96, (3, 3), strides=2, name="branch3x3dbl_3")(bd)
    return jnp.concatenate([b3, bd, _max_pool(x, 2)], axis=-1)


class InceptionC(nn.Module):
  """Mixed_6b..6e (17x17), factorised 7x7 convolutions."""
  channels_7x7: int

  @nn.compact
  def __call__(self, x):
    c7 = self.channels_7x7
    row, col = (1, 7), (7, 1)
    row_pad, col_pad = (0, 3), (3, 0)
    b1 = ConvBN(192, (1, 1), name="branch1x1")(x)
    b7 = ConvBN(c7, (1, 1), name="branch7x7_1")(x)
    b7 = ConvBN(c7, row, padding=row_pad, name="branch7x7_2")(b7)
    b7 = ConvBN(192, col, padding=col_pad, name="branch7x7_3")(b7)
    bd = ConvBN(c7, (1, 1), name="branch7x7dbl_1")(x)
    bd = ConvBN(c7, col, padding=col_pad, name="branch7x7dbl_2")(bd)
    bd = ConvBN(c7, row, padding=row_pad, name="branch7x7dbl_3")(bd)
    bd = ConvBN(c7, col, padding=col_pad, name="branch7x7dbl_4")(bd)
    bd = ConvBN(192, row, padding=row_pad, name="branch7x7dbl_5")(bd)
    bp = ConvBN(192, (1, 1), name="branch_pool")(_avg_pool_same(x))
    return jnp.concatenate([b1, b7, bd, bp], axis=-1)


class InceptionD(nn.Module):
  """Mixed_7a: 17x17 -> 8x8."""

  @nn.compact
  def __call__(self, x):
    b3 = ConvBN(192, (1, 1), name="branch3x3_1")(x)
    b3 = ConvBN(320, (3, 3), strides=2, name="branch3x3_2")(b3)
    b7 = ConvBN(192, (1, 1), name="branch7x7x3_1")(x)
    b7 = ConvBN(192, (1, 7), padding=(0, 3), name="branch7x7x3_2")(b7)
    b7 = ConvBN(192, (7, 1), padding=(3, 0), name="branch7x7x3_3")(b7)
    b7 = ConvBN(192, (3, 3), strides=2, name="branch7x7x3_4")(b7)
    return jnp.concatenate([b3, b7, _max_pool(x, 2)], axis=-1)


class InceptionE(nn.Module):
  """Mixed_7b and 7c (8x8); `max_pool` marks the FID graph's Mixed_7c."""
  max_pool: bool = False

  @nn.compact
  def __call__(self, x):
    b1 = ConvBN(320, (1, 1), name="branch1x1")(x)
    b3 = ConvBN(384, (1, 1), name="branch3x3_1")(x)
    b3 = jnp.concatenate([
        ConvBN(384, (1, 3), padding=(0, 1), name="branch3x3_2a")(b3),
        ConvBN(384, (3, 1), padding=(1, 0), name="branch3x3_2b")(b3)], axis=-1)
    bd = ConvBN(448, (1, 1), name="branch3x3dbl_1")(x)
    bd = ConvBN(384, (3, 3), padding=(1, 1), name="branch3x3dbl_2")(bd)
    bd = jnp.concatenate([
        ConvBN(384, (1, 3), padding=(0, 1), name="branch3x3dbl_3a")(bd),
        ConvBN(384, (3, 1), padding=(1, 0), name="branch3x3dbl_3b")(bd)], axis=-1)
    pooled = _max_pool(x, 1, pad=1) if self.max_pool else _avg_pool_same(x)
    bp = ConvBN(192, (1, 1), name="branch_pool")(pooled)
    return jnp.concatenate([b1, b3, bd, bp], axis=-1)


class InceptionV3(nn.Module):
  """The FID InceptionV3. `__call__(x)` with x from `preprocess`, [N, 299, 299, 3].

  Returns {"pool3": [N, 2048], "logits": [N, 1008]}. Other input sizes (>= 75)
  run too, but FID is defined at 299x299.
  """

  @nn.compact
  def __call__(self, x):
    x = ConvBN(32, (3, 3), strides=2, name="Conv2d_1a_3x3")(x)  # 149x149
    x = ConvBN(32, (3, 3), name="Conv2d_2a_3x3")(x)  # 147x147
    x = ConvBN(64, (3, 3), padding=(1, 1), name="Conv2d_2b_3x3")(x)
    x = _max_pool(x, 2)  # 73x73
    x = ConvBN(80, (1, 1), name="Conv2d_3b_1x1")(x)
    x = ConvBN(192, (3, 3), name="Conv2d_4a_3x3")(x)  # 71x71
    x = _max_pool(x, 2)  # 35x35
    x = InceptionA(32, name="Mixed_5b")(x)
    x = InceptionA(64, name="Mixed_5c")(x)
    x = InceptionA(64, name="Mixed_5d")(x)
    x = InceptionB(name="Mixed_6a")(x)  # 17x17
    x = InceptionC(128, name="Mixed_6b")(x)
    x = InceptionC(160, name="Mixed_6c")(x)
    x = InceptionC(160, name="Mixed_6d")(x)
    x = InceptionC(192, name="Mixed_6e")(x)
    x = InceptionD(name="Mixed_7a")(x)  # 8x8
    x = InceptionE(name="Mixed_7b")(x)
    x = InceptionE(max_pool=True, name="Mixed_7c")(x)
    pool3 = jnp.mean(x, axis=(1, 2))
    logits = nn.Dense(NUM_LOGITS, name="fc")(pool3)
    return {"pool3": pool3, "logits": logits}


# --- Input preprocessing ------------------------------------------------------------------------


def resize_matrix(size_in: int, size_out: int, mode: str = "tf1") -> np.ndarray:
  """[size_out, size_in] bilinear interpolation weights along one axis.

  "tf1" is TensorFlow 1's `resize_bilinear` (align_corners=False, no half-pixel
  centres: output pixel i samples input coordinate i * in / out), the resize
  inside the TF FID graph. "pytorch_fid" is `F.interpolate(..., "bilinear",
  align_corners=False)`: half-pixel centres, as pytorch-fid resizes.
  """
  if mode not in RESIZE_MODES:
    raise ValueError(f"resize mode must be one of {RESIZE_MODES}, got {mode!r}")
  scale = size_in / size_out
  dst = np.arange(size_out, dtype=np.float64)
  src = dst * scale if mode == "tf1" else (dst + 0.5) * scale - 0.5
  src = np.clip(src, 0, size_in - 1)
  lo = np.floor(src).astype(int)
  hi = np.minimum(lo + 1, size_in - 1)
  frac = src - lo
  weights = np.zeros((size_out, size_in))
  np.add.at(weights, (np.arange(size_out), lo), 1 - frac)
  np.add.at(weights, (np.arange(size_out), hi), frac)
  return weights


def to_pixels(images, quantize: bool = True):
  """uint8 [N,H,W,C] or float [-1, 1] -> float32 pixel values in [0, 255].

  Floats are rounded to 8 bits by default, so samples are measured as the PNGs a
  user would save, and exactly like reference images that were uint8 all along.
  """
  if images.dtype == jnp.uint8:
    return images.astype(jnp.float32)
  pixels = jnp.clip((images.astype(jnp.float32) + 1.0) * 127.5, 0.0, 255.0)
  return jnp.round(pixels) if quantize else pixels


def preprocess(images, resize: str = "tf1", quantize: bool = True):
  """Images -> the FID network's input: float32 [N, 299, 299, 3].

  Args:
    images: uint8 [N, H, W, C] in [0, 255], or float [N, H, W, C] in [-1, 1]; C is
      3, or 1 (grey, repeated to RGB).
    resize: "tf1" (default): bilinear resize and (x - 128) / 128 scaling as inside
      the TF FID graph (TTUR, ADM evaluator, clean-fid `legacy_tensorflow`).
      "pytorch_fid": half-pixel bilinear resize and x / 127.5 - 1, as pytorch-fid.
    quantize: round float images to 8 bits first (see `to_pixels`).

  Works on numpy or jax arrays, inside or outside jit.
  """
  if images.ndim != 4 or images.shape[-1] not in (1, 3):
    raise ValueError(f"images must be [N, H, W, 1 or 3], got shape {images.shape}")
  x = to_pixels(jnp.asarray(images), quantize)
  if x.shape[-1] == 1:
    x = jnp.repeat(x, 3, axis=-1)
  _, h, w, _ = x.shape
  if (h, w) != (INPUT_SIZE, INPUT_SIZE):
    rows = jnp.asarray(resize_matrix(h, INPUT_SIZE, resize), jnp.float32)
    cols = jnp.asarray(resize_matrix(w, INPUT_SIZE, resize), jnp.float32)
    x = jnp.einsum("yh,nhwc,xw->nyxc", rows, x, cols, precision=jax.lax.Precision.HIGHEST)
  if resize == "tf1":
    return (x - 128.0) / 128.0
  if resize == "pytorch_fid":
    return x / 127.5 - 1.0
  raise ValueError(f"resize mode must be one of {RESIZE_MODES}, got {resize!r}")


# --- Parameters ---------------------------------------------------------------------------------


@functools.lru_cache(maxsize=None)
def variable_shapes() -> dict[str, tuple[int, ...]]:
  """{"params/Conv2d_1a_3x3/conv/kernel": shape, ...} for every variable of the network."""
  abstract = jax.eval_shape(InceptionV3().init, jax.random.key(0),
                            jax.ShapeDtypeStruct((1, INPUT_SIZE, INPUT_SIZE, 3), jnp.float32))
  return {"/".join(str(k.key) for k in path): tuple(leaf.shape)
          for path, leaf in jax.tree_util.tree_leaves_with_path(abstract)}


def missing_weights_message(path: str) -> str:
  return (
      f"FID Inception weights not found at {path!r}. This code never downloads them. "
      f"The standard FID network is TensorFlow's inception-2015-12-05 graph; pytorch-fid "
      f"publishes its weights as {TORCH_WEIGHTS_NAME} ({TORCH_WEIGHTS_URL}). Fetch that file "
      f"yourself, then convert it once (needs torch, CPU build is enough): {CONVERT_COMMAND}")


def load_inception_params(path: str) -> dict[str, Any]:
  """Loads converted FID weights: {"params": ..., "batch_stats": ...} for `InceptionV3`.

  Raises:
    FileNotFoundError: `path` does not exist; the message says where the
      standard weights come from and the conversion command.
    ValueError: the file does not hold exactly this network's variables.
  """
  path = os.path.expanduser(path)
  if not os.path.exists(path):
    raise FileNotFoundError(missing_weights_message(path))
  tree, _ = tree_io.load(path)
  flat = tree_io.flatten(tree)
  check_variables(flat, source=path)
  return tree_io.unflatten({k: v.astype(np.float32) for k, v in flat.items()})


def check_variables(flat: dict[str, np.ndarray], source: str = "variables"):
  """Raises ValueError unless `flat` has exactly the network's variable names and shapes."""
  expected = variable_shapes()
  missing = sorted(set(expected) - set(flat))
  extra = sorted(set(flat) - set(expected))
  wrong = sorted(k for k in set(expected) & set(flat) if flat[k].shape != expected[k])
  if missing or extra or wrong:
    details = [f"missing {missing[:5]}" * bool(missing), f"unexpected {extra[:5]}" * bool(extra),
               ", ".join(f"{k}: {flat[k].shape} != {expected[k]}" for k in wrong[:5])]
    raise ValueError(f"{source} does not match the FID InceptionV3: "
                     + "; ".join(d for d in details if d))


def variables_digest(variables) -> str:
  """The weights' name in reports and statistics files: `tree_io.digest`."""
  return tree_io.digest(variables)


def random_variables(seed: int = 0) -> dict[str, Any]:
  """Random variables of the right shapes: for tests and shape checks, never for FID.

  Drawn with numpy (no compilation), He-scaled so activations stay finite.
  """
  rng = np.random.default_rng(seed)
  flat = {}
  for path, shape in variable_shapes().items():
    leaf = path.rsplit("/", 1)[-1]
    if leaf == "kernel":
      fan_in = int(np.prod(shape[:-1]))
      flat[path] = rng.normal(0, np.sqrt(2.0 / fan_in), shape).astype(np.float32)
    elif leaf in ("scale", "var"):
      flat[path] = np.ones(shape, np.float32)
    else:  # bias, mean
      flat[path] = np.zeros(shape, np.float32)
  return tree_io.unflatten(flat)


def features_and_logits(variables, images, resize: str = "tf1", quantize: bool = True
                        ) -> dict[str, jax.Array]:
  """images -> {"features": pool3 [N, 2048], "logits": [N, 1008]}.

  Pure and jittable, with the variables an argument rather than a closed-over
  constant (100 MB of constants would slow compilation); the shape
  `fid.compute_stats` expects of its `apply_fn` (bind `resize` with partial).
  """
  out = InceptionV3().apply(variables, preprocess(images, resize, quantize))
  return {"features": out["pool3"], "logits": out["logits"]}
