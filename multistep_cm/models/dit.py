"""DiT and SiT in Flax: the Diffusion Transformer of Peebles & Xie (2023) and the Scalable
Interpolant Transformer of Ma et al. (2024), which is the same network trained on a flow.

The network on latents [B, H, W, C] (NHWC): a p x p patch embedding, the fixed 2-D sine-cosine
position embedding (computed for the input's grid, never a parameter), a sinusoidal timestep
embedding through a two-layer SiLU MLP plus a class embedding whose row `num_classes` is the
null class (classifier-free guidance's dropped label), `depth` adaLN-Zero blocks (LayerNorm
without affine, shift/scale/gate from SiLU(c) for attention and for the tanh-GELU MLP), and a
final adaLN layer projecting each token back to p x p x out pixels. With `learn_sigma` the
output has 2C channels, the second half DiT's variance interpolation; the module returns the
first C (DiT's ε, SiT's velocity) unless `return_sigma`, so the call `net(z, t, labels)` is
the teacher's own and has z's shape.

Two published forwards differ: the authors' code divides the timestep frequencies' exponent by
`half` and uses LayerNorm eps 1e-6 before the MLP; diffusers' `DiTTransformer2DModel` divides
by `half - 1` and uses 1e-5 there (`time_freq_shift=1`, `mlp_norm_eps=1e-5`). The defaults are
the authors', which the published weights were trained with.

Variable names follow the authors' modules (`blocks_3/attn/qkv`, `t_embedder/mlp_0`), so
converting their state dict is a rename and transposes (multistep_cm/convert.py). Parameters
carry our logical axis names (partitioning.py); matmuls run in `dtype`, norms, modulation and
the embeddings in float32. The blocks are one `nn.scan` ('blocks', stacked on a leading axis)
or unrolled (`blocks_0`, ...), each optionally rematerialised.
"""
import json
import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from multistep_cm.models import layers

Dtype = Any

# The DiT paper's sizes (Table 1): depth, hidden size, heads.
SIZES = {"S": (12, 384, 6), "B": (12, 768, 12), "L": (24, 1024, 16), "XL": (28, 1152, 16)}
PATCHES = (2, 4, 8)


def timestep_embedding(t: jax.Array, dim: int, freq_shift: float = 0.0,
                       max_period: float = 10000.0) -> jax.Array:
  """[cos, sin] of t times `dim / 2` geometric frequencies from 1 down to ~1/max_period,
  float32 [B] -> [B, dim]; the exponent is divided by `half - freq_shift`."""
  if dim % 2:
    raise ValueError(f"the frequency embedding size must be even, got {dim}")
  half = dim // 2
  exponent = -math.log(max_period) * np.arange(half, dtype=np.float32) / (half - freq_shift)
  freqs = jnp.asarray(np.exp(exponent), jnp.float32)
  angles = jnp.asarray(t, jnp.float32)[:, None] * freqs[None, :]
  return jnp.concatenate([jnp.cos(angles), jnp.sin(angles)], axis=-1)


def position_embedding(height: int, width: int, dim: int) -> np.ndarray:
  """DiT's fixed 2-D sine-cosine embedding of a height x width grid, [height * width, dim],
  tokens in row-major order. The first half of the channels encodes the column, the second
  the row (MAE's layout), each as [sin, cos] at frequencies 1 / 10000^(k / (dim / 4))."""
  if dim % 4:
    raise ValueError(f"the hidden size must be divisible by 4, got {dim}")
  quarter = dim // 4
  omega = 1.0 / 10000.0 ** (np.arange(quarter, dtype=np.float64) / quarter)
  rows, cols = np.meshgrid(np.arange(height, dtype=np.float64),
                           np.arange(width, dtype=np.float64), indexing="ij")

  def one(pos):
    angles = pos.reshape(-1)[:, None] * omega[None, :]
    return np.concatenate([np.sin(angles), np.cos(angles)], axis=1)

  return np.concatenate([one(cols), one(rows)], axis=1).astype(np.float32)


def _dense(features, names, dtype, name, init=None):
  init = init or nn.initializers.xavier_uniform()
  return nn.Dense(features, dtype=dtype, param_dtype=jnp.float32,
                  kernel_init=nn.with_logical_partitioning(init, names),
                  bias_init=nn.with_logical_partitioning(nn.initializers.zeros, names[1:]),
                  name=name)


def _layer_norm(x, eps):
  return nn.LayerNorm(epsilon=eps, use_scale=False, use_bias=False, dtype=jnp.float32)(
      x.astype(jnp.float32))


def _modulate(x, shift, scale):
  return x * (1.0 + scale[:, None, :]) + shift[:, None, :]


class Attention(nn.Module):
  """Multi-head self-attention with one fused qkv projection (rows q | k | v)."""
  hidden_size: int
  num_heads: int
  dtype: Dtype = jnp.float32
  attention_impl: str = "xla"

  @nn.compact
  def __call__(self, x):
    batch, tokens, _ = x.shape
    head_dim = self.hidden_size // self.num_heads
    qkv = _dense(3 * self.hidden_size, ("embed", "qkv"), self.dtype, "qkv")(x)
    qkv = qkv.reshape(batch, tokens, 3, self.num_heads, head_dim)
    h = jax.nn.dot_product_attention(qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2],
                                     implementation=self.attention_impl)
    h = h.reshape(batch, tokens, self.hidden_size)
    return _dense(self.hidden_size, ("heads", "embed"), self.dtype, "proj")(h)


class Mlp(nn.Module):
  hidden_size: int
  mlp_hidden: int
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x):
    h = _dense(self.mlp_hidden, ("embed", "mlp"), self.dtype, "fc1")(x)
    h = nn.gelu(h, approximate=True)
    return _dense(self.hidden_size, ("mlp", "embed"), self.dtype, "fc2")(h)


class DiTBlock(nn.Module):
  """adaLN-Zero: x + gate * f(LN(x) * (1 + scale) + shift), for attention then the MLP."""
  hidden_size: int
  num_heads: int
  mlp_ratio: float = 4.0
  mlp_norm_eps: float = 1e-6
  dtype: Dtype = jnp.float32
  attention_impl: str = "xla"

  @nn.compact
  def __call__(self, x, c):
    x = layers.constrain_batch(x)
    mod = _dense(6 * self.hidden_size, ("cond", "modulation"), jnp.float32, "adaLN_modulation",
                 init=nn.initializers.zeros)(nn.silu(c))
    shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = jnp.split(mod, 6, axis=-1)
    h = _modulate(_layer_norm(x, 1e-6), shift_msa, scale_msa).astype(self.dtype)
    h = Attention(self.hidden_size, self.num_heads, self.dtype, self.attention_impl,
                  name="attn")(h)
    x = x + gate_msa[:, None, :] * h.astype(jnp.float32)
    h = _modulate(_layer_norm(x, self.mlp_norm_eps), shift_mlp, scale_mlp).astype(self.dtype)
    h = Mlp(self.hidden_size, int(self.hidden_size * self.mlp_ratio), self.dtype,
            name="mlp")(h)
    return x + gate_mlp[:, None, :] * h.astype(jnp.float32)


class DiT(nn.Module):
  """DiT / SiT on [B, H, W, C] latents, called as `net(z, t, labels)`.

  Attributes:
    patch_size, hidden_size, depth, num_heads, mlp_ratio: the transformer's shape.
    num_classes: class labels 0..num_classes-1, and the null class `num_classes` (the table
      has num_classes + 1 rows; labels None means the null class).
    learn_sigma: the output has twice the input's channels (DiT's Σ head); the module
      returns the first half unless `return_sigma`.
    frequency_embedding_size, time_freq_shift, mlp_norm_eps: the timestep embedding and the
      MLP norm (see the module docstring for the two published forwards).
    dtype: compute dtype of matmuls and the patch convolution (parameters stay float32).
    scan, remat, remat_policy: the blocks as one `nn.scan` and/or rematerialised.
    attention_impl: "xla" or "cudnn" (as jax.nn.dot_product_attention).
  """
  patch_size: int = 2
  hidden_size: int = 1152
  depth: int = 28
  num_heads: int = 16
  mlp_ratio: float = 4.0
  num_classes: int = 1000
  learn_sigma: bool = True
  return_sigma: bool = False
  frequency_embedding_size: int = 256
  time_freq_shift: float = 0.0
  mlp_norm_eps: float = 1e-6
  dtype: Dtype = jnp.float32
  scan: bool = True
  remat: bool = False
  remat_policy: str = "nothing_saveable"
  attention_impl: str = "xla"

  @nn.compact
  def __call__(self, z: jax.Array, t: jax.Array, labels: jax.Array | None = None) -> jax.Array:
    batch, height, width, channels = z.shape
    p = self.patch_size
    if height % p or width % p:
      raise ValueError(f"a DiT with patch {p} needs sides divisible by {p}, got {height}x{width}")
    if self.hidden_size % self.num_heads:
      raise ValueError(f"hidden_size {self.hidden_size} is not divisible by num_heads "
                       f"{self.num_heads}")
    out_channels = 2 * channels if self.learn_sigma else channels
    x = nn.Conv(self.hidden_size, (p, p), strides=(p, p), padding="VALID", dtype=self.dtype,
                param_dtype=jnp.float32,
                kernel_init=nn.with_logical_partitioning(nn.initializers.xavier_uniform(),
                                                         (None, None, "channels", "embed")),
                bias_init=nn.with_logical_partitioning(nn.initializers.zeros, ("embed",)),
                name="x_embedder")(layers.constrain_batch(z.astype(self.dtype)))
    grid_h, grid_w = height // p, width // p
    x = x.reshape(batch, grid_h * grid_w, self.hidden_size).astype(jnp.float32)
    x = x + jnp.asarray(position_embedding(grid_h, grid_w, self.hidden_size))[None]

    t = jnp.broadcast_to(jnp.asarray(t, jnp.float32), (batch,))
    freq = timestep_embedding(t, self.frequency_embedding_size, self.time_freq_shift)
    cond = _TimestepEmbedder(self.hidden_size, name="t_embedder")(freq)
    if labels is None:
      labels = jnp.full((batch,), self.num_classes, jnp.int32)
    cond = cond + _LabelEmbedder(self.num_classes, self.hidden_size, name="y_embedder")(labels)

    block_cls = layers.maybe_remat(DiTBlock, self.remat, self.remat_policy, in_scan=self.scan)
    kwargs = dict(hidden_size=self.hidden_size, num_heads=self.num_heads,
                  mlp_ratio=self.mlp_ratio, mlp_norm_eps=self.mlp_norm_eps, dtype=self.dtype,
                  attention_impl=self.attention_impl)
    if self.scan:
      stack = nn.scan(lambda block, carry, cc: (block(carry, cc), None),
                      variable_axes={"params": 0}, split_rngs={"params": True},
                      in_axes=nn.broadcast, length=self.depth,
                      metadata_params={nn.PARTITION_NAME: "layers"})
      x, _ = stack(block_cls(**kwargs, name="blocks"), x, cond)
    else:
      for i in range(self.depth):
        x = block_cls(**kwargs, name=f"blocks_{i}")(x, cond)

    x = _FinalLayer(self.hidden_size, p * p * out_channels, self.dtype, name="final_layer")(
        x, cond)
    x = x.reshape(batch, grid_h, grid_w, p, p, out_channels).transpose(0, 1, 3, 2, 4, 5)
    out = x.reshape(batch, height, width, out_channels).astype(jnp.float32)
    return out if self.return_sigma else out[..., :channels]


class _TimestepEmbedder(nn.Module):
  hidden_size: int

  @nn.compact
  def __call__(self, freq):
    normal = nn.initializers.normal(0.02)
    h = _dense(self.hidden_size, ("cond_in", "cond"), jnp.float32, "mlp_0", normal)(freq)
    return _dense(self.hidden_size, ("cond_in", "cond"), jnp.float32, "mlp_2", normal)(
        nn.silu(h))


class _LabelEmbedder(nn.Module):
  num_classes: int
  hidden_size: int

  @nn.compact
  def __call__(self, labels):
    return nn.Embed(self.num_classes + 1, self.hidden_size, dtype=jnp.float32,
                    param_dtype=jnp.float32,
                    embedding_init=nn.with_logical_partitioning(nn.initializers.normal(0.02),
                                                                ("vocab", "cond")),
                    name="embedding_table")(jnp.asarray(labels, jnp.int32))


class _FinalLayer(nn.Module):
  hidden_size: int
  features: int
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x, c):
    mod = _dense(2 * self.hidden_size, ("cond", "modulation"), jnp.float32, "adaLN_modulation",
                 init=nn.initializers.zeros)(nn.silu(c))
    shift, scale = jnp.split(mod, 2, axis=-1)
    h = _modulate(_layer_norm(x, 1e-6), shift, scale).astype(self.dtype)
    return _dense(self.features, ("embed", "channels"), self.dtype, "linear",
                  init=nn.initializers.zeros)(h)


# The settings a converted checkpoint records (convert.py writes them; `from_settings` reads).
SETTINGS = ("patch_size", "hidden_size", "depth", "num_heads", "mlp_ratio", "num_classes",
            "learn_sigma", "frequency_embedding_size", "time_freq_shift", "mlp_norm_eps",
            "scan")


def preset(size: str, patch: int, **overrides) -> DiT:
  """The paper's DiT-`size`/`patch` (SiT's sizes are the same) on ImageNet's 1000 classes,
  with learned Σ (true of DiT's and of SiT-XL/2-256's published weights)."""
  if size not in SIZES or patch not in PATCHES:
    raise ValueError(f"DiT sizes are {sorted(SIZES)} with patch {PATCHES}, got {size}/{patch}")
  depth, hidden, heads = SIZES[size]
  return DiT(**{"patch_size": patch, "hidden_size": hidden, "depth": depth,
                "num_heads": heads, **overrides})


def from_settings(path_or_dict) -> DiT:
  """The DiT a converter's JSON (or its `settings` dict) describes, e.g. in a teacher file:
  `def make(): return dit.from_settings("dit_xl_2.json")`."""
  settings = path_or_dict
  if isinstance(path_or_dict, str):
    with open(path_or_dict) as f:
      settings = json.load(f)
  settings = settings.get("settings", settings)
  # in_channels and input_size describe the data (the module reads them from its input).
  unknown = sorted(set(settings) - set(SETTINGS) - {"in_channels", "input_size"})
  if unknown:
    raise ValueError(f"unknown DiT settings {unknown}; known: {list(SETTINGS)}")
  return DiT(**{k: v for k, v in settings.items() if k in SETTINGS})


def _factory(kind: str, size: str, patch: int):
  def make() -> DiT:
    return preset(size, patch)
  make.__name__ = f"{kind}_{size.lower()}_{patch}"
  what = "ε (the first half of the learned-Σ output)" if kind == "dit" else "the velocity"
  make.__doc__ = (f"{kind.upper()}-{size}/{patch} as a teacher module: `net(z, t, labels)` "
                  f"returns {what}.")
  return make


# Factories for config.teacher.module: multistep_cm.models.dit:dit_xl_2, ...:sit_xl_2, ...
for _kind in ("dit", "sit"):
  for _size in SIZES:
    for _patch in PATCHES:
      _f = _factory(_kind, _size, _patch)
      globals()[_f.__name__] = _f
del _kind, _size, _patch, _f


def dit_xl_2_bf16_remat() -> DiT:
  """DiT-XL/2 computing in bfloat16 (parameters, norms and softmax in float32), its blocks
  rematerialised: the published weights' network, for training a student of it on
  accelerators (configs/imagenet256_dit_cd.py)."""
  return preset("XL", 2, dtype=jnp.bfloat16, remat=True)


def sit_xl_2_bf16_remat() -> DiT:
  """SiT-XL/2 the same way (configs/imagenet256_sit_cd.py)."""
  return preset("XL", 2, dtype=jnp.bfloat16, remat=True)


def dit_digits_8px() -> DiT:
  """A small DiT for the embedded 8x8 digits (10 classes): patch 2 (16 tokens), width 128,
  6 blocks of 4 heads, learned Σ; trained here as a teacher by
  `configs/digits_pipeline.py:arch=dit`."""
  return DiT(patch_size=2, hidden_size=128, depth=6, num_heads=4, num_classes=10)
