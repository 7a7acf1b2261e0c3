"""UViT: the U-Net with a transformer core of simple diffusion (Hoogeboom et al. 2023).

ResNet-block stages at high resolution, transformer stages at low resolution, a mid stack
of transformer blocks (one `nn.scan`), and a mirrored up path with U-Net skips. The network
outputs v-hat (docs/maths.md §1.3) and is conditioned on logSNR(t) and either a class label
with an extra null class or a sequence of precomputed text embeddings with their mask (§15.2).
Attention runs through `jax.nn.dot_product_attention` (`attention_impl`: "xla" or "cudnn").

The architecture: docs/maths.md §7.2; the design (the choices where the papers are silent,
mixed precision, attention, the scanned mid stack): docs/design.md#the-uvit.
"""
from collections.abc import Mapping
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from multistep_cm.models import layers

Dtype = Any
BLOCK_TYPES = ("res", "attn")
ATTENTION_IMPLS = ("xla", "cudnn")


class ResBlock(nn.Module):
  """Conv residual block with FiLM conditioning; input may be wider than `width`."""
  width: int
  num_groups: int = 32
  dropout: float = 0.0
  deterministic: bool = True
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, cond: jax.Array) -> jax.Array:
    x = layers.constrain_batch(x)
    h = nn.swish(layers.group_norm(self.num_groups, name="norm0")(x))
    h = layers.conv3x3(self.width, ("fan_in", "embed"), dtype=self.dtype,
                       name="conv0")(h.astype(self.dtype))
    h = layers.group_norm(self.num_groups, name="norm1")(h)
    h = nn.swish(layers.film(h, cond, name="film1"))
    h = layers.dropout(h, self.dropout, self.deterministic)
    h = layers.conv3x3(self.width, ("fan_in", "embed"), dtype=self.dtype, zero_init=True,
                       name="conv1")(h.astype(self.dtype))
    if x.shape[-1] != self.width:
      x = layers.dense(self.width, ("fan_in", "embed"), dtype=self.dtype,
                       name="shortcut")(x)
    return x + h


class TransformerBlock(nn.Module):
  """Pre-LN self-attention (+ cross-attention) + MLP block on [B, H, W, C] with FiLM
  conditioning.

  With a `skip` input the block first projects concat(x, skip) back to
  `width` (the U-Net skip of the up path). With `cross_attention` it takes a text
  `context` [B, S, width] and its key mask bool [B, S] (`layers.TextContext`).
  """
  width: int
  head_dim: int = 128
  mlp_ratio: int = 4
  dropout: float = 0.0
  deterministic: bool = True
  dtype: Dtype = jnp.float32
  attention_impl: str = "xla"
  cross_attention: bool = False

  @nn.compact
  def __call__(self, x: jax.Array, cond: jax.Array, skip: jax.Array | None = None,
               context: jax.Array | None = None,
               context_mask: jax.Array | None = None) -> jax.Array:
    if skip is not None:
      x = layers.dense(self.width, ("fan_in", "embed"), dtype=self.dtype, name="skip_proj")(
          jnp.concatenate([x, skip], axis=-1))
    x = layers.constrain_batch(x)
    batch, height, width, _ = x.shape
    num_heads = self.width // self.head_dim

    h = layers.modulated_layer_norm(x, cond, name="norm0").astype(self.dtype)
    qkv = layers.dense(3 * self.width, ("embed", "qkv"), dtype=self.dtype, name="qkv")(h)
    qkv = qkv.reshape(batch, height * width, 3, num_heads, self.head_dim)
    q, k, v = qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2]
    # Either implementation computes the logits and softmax in float32.
    h = jax.nn.dot_product_attention(q, k, v, implementation=self.attention_impl)
    h = h.reshape(batch, height, width, self.width)
    h = layers.dense(self.width, ("heads", "embed"), dtype=self.dtype, zero_init=True,
                     name="attn_out")(h)
    x = x + layers.dropout(h, self.dropout, self.deterministic)

    if self.cross_attention:
      if context is None or context_mask is None:
        raise ValueError("a TransformerBlock with cross_attention needs context and "
                         "context_mask")
      x = x + layers.dropout(self._cross_attend(x, cond, context, context_mask),
                             self.dropout, self.deterministic)

    h = layers.modulated_layer_norm(x, cond, name="norm1").astype(self.dtype)
    h = layers.dense(self.mlp_ratio * self.width, ("embed", "mlp"), dtype=self.dtype,
                     name="mlp_in")(h)
    h = layers.dense(self.width, ("mlp", "embed"), dtype=self.dtype, zero_init=True,
                     name="mlp_out")(nn.gelu(h))
    return x + layers.dropout(h, self.dropout, self.deterministic)

  def _cross_attend(self, x: jax.Array, cond: jax.Array, context: jax.Array,
                    context_mask: jax.Array) -> jax.Array:
    """Pre-LN cross-attention sub-block: queries from x, keys/values from the text.

    Its output projection is zero-initialised, so the sub-block starts as the identity
    and a text model starts where the unconditional one is. Always XLA attention: the
    text sequence is short (1 + L keys, L = 128 for t2i_512), so its float32 logits
    [B, heads, HW, 1 + L] are small next to self-attention's [B, heads, HW, HW].
    """
    batch, height, width, _ = x.shape
    num_heads = self.width // self.head_dim
    h = layers.modulated_layer_norm(x, cond, name="norm_cross").astype(self.dtype)
    q = layers.dense(self.width, ("embed", "qkv"), dtype=self.dtype, name="cross_q")(h)
    q = q.reshape(batch, height * width, num_heads, self.head_dim)
    kv = layers.dense(2 * self.width, ("embed", "qkv"), dtype=self.dtype, name="cross_kv")(
        context.astype(self.dtype))
    kv = kv.reshape(batch, context.shape[1], 2, num_heads, self.head_dim)
    # Logits and softmax in float32 (as in self-attention); masked keys get weight 0.
    h = jax.nn.dot_product_attention(q, kv[:, :, 0], kv[:, :, 1],
                                     mask=context_mask[:, None, None, :], implementation="xla")
    h = h.reshape(batch, height, width, self.width)
    return layers.dense(self.width, ("heads", "embed"), dtype=self.dtype, zero_init=True,
                        name="cross_out")(h)


class TransformerStack(nn.Module):
  """`num_layers` identical transformer blocks, scanned or unrolled.

  Scanned: one `nn.scan` named 'layers' with parameters stacked on a leading
  axis (logical name 'layers'). Unrolled: modules 'layers_0', 'layers_1', ...
  `stack_layers` / `unstack_layers` convert between the two parameter trees.
  """
  num_layers: int
  width: int
  head_dim: int = 128
  mlp_ratio: int = 4
  dropout: float = 0.0
  deterministic: bool = True
  dtype: Dtype = jnp.float32
  scan: bool = True
  remat: bool = False
  remat_policy: str = "nothing_saveable"
  attention_impl: str = "xla"
  cross_attention: bool = False

  @nn.compact
  def __call__(self, x: jax.Array, cond: jax.Array, context: jax.Array | None = None,
               context_mask: jax.Array | None = None) -> jax.Array:
    """`context`, `context_mask`: the text every block cross-attends to (`cross_attention`)."""
    block_cls = layers.maybe_remat(TransformerBlock, self.remat, self.remat_policy,
                                   in_scan=self.scan)
    kwargs = dict(width=self.width, head_dim=self.head_dim, mlp_ratio=self.mlp_ratio,
                  dropout=self.dropout, deterministic=self.deterministic, dtype=self.dtype,
                  attention_impl=self.attention_impl, cross_attention=self.cross_attention)
    if not self.scan:
      for i in range(self.num_layers):
        x = block_cls(**kwargs, name=f"layers_{i}")(x, cond, None, context, context_mask)
      return x
    scan = nn.scan(
        lambda block, carry, c, ctx, m: (block(carry, c, None, ctx, m), None),
        variable_axes={"params": 0},
        split_rngs={"params": True, "dropout": True},  # independent masks per layer
        in_axes=nn.broadcast,
        length=self.num_layers,
        metadata_params={nn.PARTITION_NAME: "layers"})
    x, _ = scan(block_cls(**kwargs, name="layers"), x, cond, context, context_mask)
    return x


def _pool(x: jax.Array) -> jax.Array:
  return nn.avg_pool(x, (2, 2), strides=(2, 2))


def _upsample(x: jax.Array) -> jax.Array:
  return jnp.repeat(jnp.repeat(x, 2, axis=1), 2, axis=2)


class UViT(nn.Module):
  """The simple-diffusion UViT; `__call__(z, logsnr, labels, train, segment)` returns v-hat.

  Attributes:
    image_size, num_channels: the input resolution and channels it is built for.
    num_classes: class-conditional with a null class at index `num_classes`;
      0 means unconditional (labels are ignored).
    block_types: per down level, "res" (ResBlocks) or "attn" (transformer blocks).
    channels: per down level, the width.
    num_blocks: per down level, the number of blocks (mirrored on the way up).
    mid_channels, mid_blocks: width and depth of the mid transformer stack,
      which runs at image_size / 2**len(channels).
    dropout: per level and then the mid stack (len(channels) + 1 rates).
    emb_dim: width of the conditioning vector.
    head_dim: attention head dimension (heads = width // head_dim).
    mlp_ratio: MLP expansion of the transformer blocks.
    num_groups: GroupNorm groups in the ResBlocks and output head.
    dtype: compute dtype of convs and matmuls (parameters stay float32).
    remat, remat_policy: rematerialise every block with a named policy
      (`layers.REMAT_POLICIES`), or with one policy per level and then the mid stack,
      comma-separated (e.g. "dense_and_conv_saveable,nothing_saveable,
      dense_and_conv_saveable" for two levels; `layers.remat_policies`).
    scan_blocks: scan the mid stack instead of unrolling it.
    attention_impl: "xla" or "cudnn" (NVIDIA GPUs, half-precision `dtype`); see above.
    segment_cond, num_step_values: the segment-layout conditioning of any-step
      Multistep CMs (`layers.Conditioning`): "none", "steps" or "segment_start".
    guidance_cond: the student is told its teacher's guidance scale w
      (`layers.Conditioning`).
    text_dim: width D of the text embeddings; 0 = no text. A text model has
      num_classes = 0 and takes, in place of `labels`, the dict
      {"text_embedding": float [B, L, D], "text_mask": int [B, L]} (1 = a real
      token, 0 = padding); None or a mask of zeros is the null conditioning.
    text_len: the padded token count L the model is initialised for (any L works:
      no parameter depends on it).
    text_route: "pooled", "cross_attention" or "both" (the default; see above).
  """
  image_size: int = 64
  num_channels: int = 3
  num_classes: int = 1000
  block_types: tuple[str, ...] = ("res", "attn")
  channels: tuple[int, ...] = (256, 512)
  num_blocks: tuple[int, ...] = (3, 3)
  mid_channels: int = 1024
  mid_blocks: int = 16
  dropout: tuple[float, ...] = (0.0, 0.0, 0.2)
  emb_dim: int = 2048
  head_dim: int = 128
  mlp_ratio: int = 4
  num_groups: int = 32
  dtype: Dtype = jnp.float32
  remat: bool = False
  remat_policy: str = "nothing_saveable"
  scan_blocks: bool = True
  attention_impl: str = "xla"
  segment_cond: str = "none"
  num_step_values: int = 0
  guidance_cond: bool = False
  text_dim: int = 0
  text_len: int = 0
  text_route: str = "both"

  def validate(self):
    """Raises ValueError naming the first inconsistent attribute."""
    layers.validate_segment_cond(self.segment_cond, self.num_step_values)
    if self.text_route not in layers.TEXT_ROUTES:
      raise ValueError(f"text_route must be one of {layers.TEXT_ROUTES}, "
                       f"got {self.text_route!r}")
    if self.text_dim < 0 or self.text_len < 0:
      raise ValueError(f"text_dim and text_len must be >= 0, got {self.text_dim}, "
                       f"{self.text_len}")
    if self.text_dim > 0 and self.num_classes > 0:
      raise ValueError(f"one kind of conditioning per model: text_dim={self.text_dim} needs "
                       f"num_classes=0, got num_classes={self.num_classes}")
    if self.text_dim > 0 and self.text_len < 1:
      raise ValueError(f"text_dim={self.text_dim} needs text_len >= 1 (the padded token "
                       f"count), got {self.text_len}")
    levels = len(self.channels)
    for key in ("block_types", "num_blocks"):
      if len(getattr(self, key)) != levels:
        raise ValueError(f"{key} must have one entry per level ({levels}, like channels), "
                         f"got {getattr(self, key)}")
    if len(self.dropout) != levels + 1:
      raise ValueError(f"dropout must have {levels + 1} rates (one per level, then mid), "
                       f"got {self.dropout}")
    for kind in self.block_types:
      if kind not in BLOCK_TYPES:
        raise ValueError(f"block_types entries must be one of {BLOCK_TYPES}, got {kind!r}")
    if self.image_size % 2**levels:
      raise ValueError(f"image_size must be divisible by 2**{levels} (one pool per level), "
                       f"got {self.image_size}")
    attn_widths = [c for c, k in zip(self.channels, self.block_types) if k == "attn"]
    for width in attn_widths + [self.mid_channels]:
      if width % self.head_dim or width % 4:
        raise ValueError(f"transformer widths must be divisible by head_dim={self.head_dim} "
                         f"and by 4, got {width}")
    for width in self.channels:
      if width % self.num_groups:
        raise ValueError(f"channels must be divisible by num_groups={self.num_groups}, "
                         f"got {width}")
    self._remat_policies()  # checks the policy names and their count
    if self.attention_impl not in ATTENTION_IMPLS:
      raise ValueError(f"attention_impl must be one of {ATTENTION_IMPLS}, "
                       f"got {self.attention_impl!r}")

  def _remat_policies(self) -> tuple[str, ...]:
    """One remat policy name per level, then the mid stack's."""
    return layers.remat_policies(self.remat_policy, len(self.channels) + 1)

  def _block(self, level: int, index: int, up: bool, train: bool):
    kind, width = self.block_types[level], self.channels[level]
    policy = self._remat_policies()[level]
    name = f"{'up' if up else 'down'}{level}_block{index}"
    common = dict(dropout=self.dropout[level], deterministic=not train, dtype=self.dtype,
                  name=name)
    if kind == "res":
      return layers.maybe_remat(ResBlock, self.remat, policy)(
          width, num_groups=self.num_groups, **common)
    return layers.maybe_remat(TransformerBlock, self.remat, policy)(
        width, head_dim=self.head_dim, mlp_ratio=self.mlp_ratio,
        attention_impl=self.attention_impl, **common)

  def _enter_transformer(self, x: jax.Array, width: int, name: str,
                         upsample: bool = False) -> jax.Array:
    """Projects to `width` (before upsampling: it commutes and is 4x cheaper), adds sin-cos."""
    if x.shape[-1] != width:
      x = layers.dense(width, ("fan_in", "embed"), dtype=self.dtype, name=name)(x)
    if upsample:
      x = _upsample(x)
    pos = layers.sincos_2d(x.shape[1], x.shape[2], width).reshape(x.shape[1:])
    return x + jnp.asarray(pos, dtype=x.dtype)

  def _text_input(self, labels: Any, batch: int) -> dict[str, jax.Array]:
    """The text dict of a text model, checked; None becomes the null conditioning."""
    if labels is None:
      return {"text_embedding": jnp.zeros((batch, self.text_len, self.text_dim), jnp.float32),
              "text_mask": jnp.zeros((batch, self.text_len), jnp.int32)}
    expected = f"{{'text_embedding': [B, L, {self.text_dim}], 'text_mask': [B, L]}}"
    if not isinstance(labels, Mapping) or set(labels) != {"text_embedding", "text_mask"}:
      got = sorted(labels) if isinstance(labels, Mapping) else type(labels).__name__
      raise ValueError(f"a text model (text_dim={self.text_dim}) takes labels={expected}, "
                       f"got {got}")
    embedding, mask = labels["text_embedding"], labels["text_mask"]
    if (embedding.ndim != 3 or embedding.shape[-1] != self.text_dim
        or mask.shape != embedding.shape[:2]):
      raise ValueError(f"text conditioning must be {expected}, got text_embedding "
                       f"{tuple(embedding.shape)} and text_mask {tuple(mask.shape)}")
    return {"text_embedding": embedding, "text_mask": mask}

  @nn.compact
  def __call__(self, z: jax.Array, logsnr: jax.Array, labels: Any = None,
               train: bool = False, segment: jax.Array | None = None,
               guidance: jax.Array | None = None) -> jax.Array:
    """v-hat [B, H, W, C] float32 from z [B, H, W, C], logsnr [B] and the conditioning:
    labels [B] or None, or for a text model the text dict or None (no tokens)."""
    self.validate()
    pooled = cross = False
    if self.text_dim > 0:
      labels = self._text_input(labels, z.shape[0])
      pooled = self.text_route in ("pooled", "both")
      cross = self.text_route in ("cross_attention", "both")
    cond = layers.Conditioning(self.emb_dim, self.num_classes, segment_cond=self.segment_cond,
                               num_step_values=self.num_step_values, pooled_text=pooled,
                               guidance_cond=self.guidance_cond,
                               name="cond")(logsnr, labels, segment, guidance)
    context = context_mask = None
    if cross:
      context, context_mask = layers.TextContext(self.mid_channels, dtype=self.dtype,
                                                 name="text_context")(
                                                     labels["text_embedding"],
                                                     labels["text_mask"])
    x = layers.constrain_batch(z.astype(self.dtype))
    x = layers.conv3x3(self.channels[0], ("fan_in", "embed"), dtype=self.dtype,
                       name="conv_in")(x)

    skips = []
    for level, kind in enumerate(self.block_types):
      if level > 0:
        x = _pool(x)
      if kind == "attn":
        x = self._enter_transformer(x, self.channels[level], f"down{level}_proj")
      for i in range(self.num_blocks[level]):
        x = self._block(level, i, up=False, train=train)(x, cond)
        skips.append(x)
      self.sow("intermediates", f"down{level}_out", x)

    x = self._enter_transformer(_pool(x), self.mid_channels, "mid_proj")
    x = TransformerStack(
        self.mid_blocks, self.mid_channels, head_dim=self.head_dim, mlp_ratio=self.mlp_ratio,
        dropout=self.dropout[-1], deterministic=not train, dtype=self.dtype,
        scan=self.scan_blocks, remat=self.remat, remat_policy=self._remat_policies()[-1],
        attention_impl=self.attention_impl, cross_attention=cross,
        name="mid")(x, cond, context, context_mask)
    self.sow("intermediates", "mid_out", x)

    for level in reversed(range(len(self.channels))):
      if self.block_types[level] == "attn":
        x = self._enter_transformer(x, self.channels[level], f"up{level}_proj", upsample=True)
        for i in range(self.num_blocks[level]):
          x = self._block(level, i, up=True, train=train)(x, cond, skips.pop())
      else:
        x = _upsample(x)
        for i in range(self.num_blocks[level]):
          x = self._block(level, i, up=True, train=train)(
              jnp.concatenate([x, skips.pop()], axis=-1), cond)
      self.sow("intermediates", f"up{level}_out", x)

    x = nn.swish(layers.group_norm(self.num_groups, name="norm_out")(x))
    x = layers.conv3x3(self.num_channels, ("embed", "channels"), dtype=self.dtype,
                       zero_init=True, name="conv_out")(x.astype(self.dtype))
    return x.astype(jnp.float32)


def _is_layer_key(key: str) -> bool:
  return key.startswith("layers_") and key[len("layers_"):].isdigit()


def unstack_layers(params: Any) -> Any:
  """Scanned -> unrolled params: every 'layers' subtree [L, ...] becomes 'layers_i'.

  Works on plain (unboxed) parameter dicts; see `partitioning.unbox`.
  """
  if not isinstance(params, dict):
    return params
  out = {}
  for key, value in params.items():
    if key == "layers":
      num_layers = jax.tree.leaves(value)[0].shape[0]
      for i in range(num_layers):
        out[f"layers_{i}"] = jax.tree.map(lambda a, i=i: a[i], value)
    else:
      out[key] = unstack_layers(value)
  return out


def stack_layers(params: Any) -> Any:
  """Unrolled -> scanned params: 'layers_0' ... 'layers_{L-1}' become 'layers' [L, ...]."""
  if not isinstance(params, dict):
    return params
  out = {k: stack_layers(v) for k, v in params.items() if not _is_layer_key(k)}
  indices = sorted(int(k[len("layers_"):]) for k in params if _is_layer_key(k))
  if indices:
    if indices != list(range(len(indices))):
      raise ValueError(f"layers_i keys must be numbered 0..L-1, got {indices}")
    blocks = [params[f"layers_{i}"] for i in indices]
    out["layers"] = jax.tree.map(lambda *a: jnp.stack(a), *blocks)
  return out
