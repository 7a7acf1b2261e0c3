"""Building blocks shared by the denoisers: named layers, conditioning, remat.

Every parameter is created with logical axis names (see `partitioning.py` for
the names and the rules that map them to mesh axes), so the train step can
shard parameters and optimiser state FSDP-style without knowing the network.

Precision policy (shared by all models): parameters are float32; matmuls and
convolutions run in the module's `dtype` (bfloat16 when selected);
normalisations, the logSNR/class conditioning and the FiLM modulation run in
float32 because they rescale whole feature maps and are cheap.
"""
from typing import Any, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

Dtype = Any


def dense_and_conv_saveable(prim, *args, **params) -> bool:
  """Remat policy: save what a dense layer or a convolution computed, recompute the rest.

  Saved: the output of every convolution and of every matmul without batch
  dimensions (the dense layers: qkv, the attention and MLP projections, the
  shortcuts). Recomputed on the backward pass: attention's two batched matmuls
  (logits and weighted values) and all element-wise work. It sits between
  `nothing_saveable` (every FLOP of the forward again) and `dots_saveable`, which
  also keeps the float32 attention logits [B, heads, L, L], the largest activation
  of a transformer block at 32 x 32 tokens. docs/performance.md, "Remat policies".
  """
  if prim is jax.lax.conv_general_dilated_p:
    return True
  return jax.checkpoint_policies.dots_with_no_batch_dims_saveable(prim, *args, **params)


REMAT_POLICIES = {
    "nothing_saveable": jax.checkpoint_policies.nothing_saveable,
    "dense_and_conv_saveable": dense_and_conv_saveable,
    "dots_saveable": jax.checkpoint_policies.dots_saveable,
    "dots_with_no_batch_dims_saveable": (
        jax.checkpoint_policies.dots_with_no_batch_dims_saveable),
    "everything_saveable": jax.checkpoint_policies.everything_saveable,
}


def remat_policy_names(spec: str) -> tuple[str, ...]:
  """The comma-separated policy names of one `remat_policy` string, each checked.

  Raises:
    ValueError: a name that is neither a key of `REMAT_POLICIES` nor "none".
  """
  names = tuple(name.strip() for name in spec.split(","))
  for name in names:
    if name != "none" and name not in REMAT_POLICIES:
      raise ValueError(f"remat_policy names must be among {sorted(REMAT_POLICIES) + ['none']}, "
                       f"got {name!r} in {spec!r}")
  return names


def remat_policies(spec: str, parts: int) -> tuple[str, ...]:
  """The policy names of `parts` groups of blocks from one `remat_policy` string.

  `spec` is one name for every group, or `parts` comma-separated names, one per group
  (the UViT's groups are its levels, then the mid stack, as for `dropout`).

  Raises:
    ValueError: an unknown name, or a count other than 1 or `parts`.
  """
  names = remat_policy_names(spec)
  if len(names) not in (1, parts):
    raise ValueError(f"remat_policy must be one policy or {parts} comma-separated ones (one "
                     f"per level, then the mid stack), got {len(names)} in {spec!r}")
  return names * parts if len(names) == 1 else names


def maybe_remat(module_cls, remat: bool, policy: str, in_scan: bool = False):
  """`module_cls` wrapped in `nn.remat` with a named policy, or unchanged.

  Args:
    module_cls: a linen Module class whose `__call__` takes arrays only.
    remat: whether to rematerialise the block's activations on the backward pass.
    policy: a key of `REMAT_POLICIES`, or "none" (same as `remat=False`).
    in_scan: inside `nn.scan` the loop already stops CSE across iterations,
      so `prevent_cse` (costly on GPU) is switched off, as `jax.checkpoint` advises.
  """
  if policy != "none" and policy not in REMAT_POLICIES:
    raise ValueError(
        f"remat_policy must be one of {sorted(REMAT_POLICIES) + ['none']}, got {policy!r}")
  if not remat or policy == "none":
    return module_cls
  return nn.remat(module_cls, policy=REMAT_POLICIES[policy], prevent_cse=not in_scan)


def constrain_batch(x: jax.Array) -> jax.Array:
  """Pins the leading (batch) axis of an activation to the logical axis 'batch'.

  A no-op unless the caller has set logical axis rules and a mesh.
  """
  return nn.with_logical_constraint(x, ("batch",) + (None,) * (x.ndim - 1))


def dense(features: int, names: tuple[str | None, str | None], *, dtype: Dtype,
          zero_init: bool = False, use_bias: bool = True, name: str | None = None):
  """`nn.Dense` whose kernel is named `names` (in, out) and bias `names[1:]`."""
  init = nn.initializers.zeros if zero_init else nn.initializers.lecun_normal()
  return nn.Dense(
      features, use_bias=use_bias, dtype=dtype, param_dtype=jnp.float32,
      kernel_init=nn.with_logical_partitioning(init, names),
      bias_init=nn.with_logical_partitioning(nn.initializers.zeros, names[1:]),
      name=name)


def conv3x3(features: int, names: tuple[str | None, str | None], *, dtype: Dtype,
            zero_init: bool = False, name: str | None = None):
  """A 3x3 'SAME' `nn.Conv`; the kernel's channel axes are named `names` (in, out)."""
  init = nn.initializers.zeros if zero_init else nn.initializers.lecun_normal()
  return nn.Conv(
      features, (3, 3), padding="SAME", dtype=dtype, param_dtype=jnp.float32,
      kernel_init=nn.with_logical_partitioning(init, (None, None) + tuple(names)),
      bias_init=nn.with_logical_partitioning(nn.initializers.zeros, names[1:]),
      name=name)


def group_norm(num_groups: int, name: str | None = None):
  """GroupNorm computed and returned in float32, with replicated scale and bias."""
  return nn.GroupNorm(
      num_groups=num_groups, epsilon=1e-6, dtype=jnp.float32, param_dtype=jnp.float32,
      scale_init=nn.with_logical_partitioning(nn.initializers.ones, ("norm",)),
      bias_init=nn.with_logical_partitioning(nn.initializers.zeros, ("norm",)),
      name=name)


def film(h: jax.Array, cond: jax.Array, name: str) -> jax.Array:
  """Scale-shift modulation `h * (1 + scale) + shift`, in float32.

  The projection from `cond` [B, E] is zero-initialised, so at initialisation
  the modulated norm is the plain norm. `h` is float32 [B, ..., C].
  """
  width = h.shape[-1]
  mod = dense(2 * width, ("cond", "modulation"), dtype=jnp.float32, zero_init=True,
              name=name)(nn.swish(cond))
  scale, shift = jnp.split(mod, 2, axis=-1)
  expand = (slice(None),) + (None,) * (h.ndim - 2) + (slice(None),)
  return h * (1.0 + scale[expand]) + shift[expand]


def modulated_layer_norm(x: jax.Array, cond: jax.Array, name: str) -> jax.Array:
  """Adaptive LayerNorm: LayerNorm without affine parameters, then `film`; float32.

  Creates the submodules `{name}` (the norm) and `{name}_film`.
  """
  h = nn.LayerNorm(epsilon=1e-6, use_scale=False, use_bias=False, dtype=jnp.float32,
                   name=name)(x)
  return film(h, cond, name=f"{name}_film")


def dropout(h: jax.Array, rate: float, deterministic: bool) -> jax.Array:
  """`nn.Dropout` (rng collection 'dropout'), or nothing at rate 0."""
  if rate <= 0:
    return h
  return nn.Dropout(rate, deterministic=deterministic)(h)


def logsnr_features(logsnr: jax.Array, num_features: int) -> jax.Array:
  """Sinusoidal features of logSNR, float32 [B] -> [B, num_features].

  Frequencies are geometric from 1/64 to 256 radians per unit of logSNR. The
  slowest has a period (~400) far wider than the logSNR range used (about
  [-20, 20]), so the embedding is injective. The fastest is set by Multistep CMs:
  the student's output must jump at every segment boundary t_step (its left
  limit maps to the data end of the segment below, its right limit to t_step
  itself), and the training grid puts the two sides 1/T = 1/1280 apart. Where
  logSNR changes slowest (t = 0.5 under a cosine schedule, |dlogSNR/dt| ~ 2 pi)
  that is a logSNR step of ~0.005, so resolving it takes frequencies of a few
  hundred (DDPM's `1000 t` embedding is ~160 per logSNR unit there). With the
  earlier top frequency of 8, the toy mixture's 2-step students lost ~2x in
  energy distance at the t = 0.5 boundary (docs/results.md, the toy mixture).
  """
  if num_features % 2:
    raise ValueError(f"logsnr_features needs an even num_features, got {num_features}")
  half = num_features // 2
  freqs = jnp.asarray(np.geomspace(1.0 / 64.0, 256.0, half), dtype=jnp.float32)
  angles = logsnr.astype(jnp.float32)[:, None] * freqs[None, :]
  return jnp.concatenate([jnp.sin(angles), jnp.cos(angles)], axis=-1)


SEGMENT_CONDITIONS = ("none", "steps", "segment_start")
# How a text-conditioned UViT reads its text embeddings (§15.2; why the default: docs/design.md).
TEXT_ROUTES = ("pooled", "cross_attention", "both")


def validate_segment_cond(segment_cond: str, num_step_values: int):
  if segment_cond not in SEGMENT_CONDITIONS:
    raise ValueError(f"segment_cond must be one of {SEGMENT_CONDITIONS}, got {segment_cond!r}")
  if segment_cond == "steps" and num_step_values < 1:
    raise ValueError(f"segment_cond='steps' needs num_step_values >= 1, got {num_step_values}")


def text_layer_norm(embedding: jax.Array) -> jax.Array:
  """LayerNorm over the text width, float32, without affine parameters: every use is
  followed by a dense layer, which absorbs a per-channel scale and shift."""
  return nn.LayerNorm(epsilon=1e-6, use_scale=False, use_bias=False, dtype=jnp.float32,
                      name="text_norm")(embedding.astype(jnp.float32))


class PooledText(nn.Module):
  """The pooled text route: text embeddings [B, L, D] -> a vector [B, emb_dim], float32.

  Each token is LayerNorm'd, the real tokens (mask 1) are averaged and a dense layer
  maps the mean to the conditioning width. A row without tokens (the null conditioning
  of classifier-free guidance, §5.5) gets the learned vector `null` instead, so its
  output does not depend on the (padding) embedding values.
  """
  emb_dim: int

  @nn.compact
  def __call__(self, embedding: jax.Array, mask: jax.Array) -> jax.Array:
    real = (mask > 0)[..., None]
    # `where`, not a product: padding rows may hold anything, even non-finite values.
    tokens = jnp.where(real, text_layer_norm(embedding), 0.0)
    count = jnp.sum(real, axis=1, dtype=jnp.float32)
    mean = jnp.sum(tokens, axis=1) / jnp.maximum(count, 1.0)
    pooled = dense(self.emb_dim, ("text", "cond"), dtype=jnp.float32, name="dense")(mean)
    null = self.param("null", nn.with_logical_partitioning(nn.initializers.normal(1.0),
                                                           ("cond",)),
                      (self.emb_dim,), jnp.float32)
    return jnp.where(count > 0, pooled, null[None, :])


class TextContext(nn.Module):
  """The cross-attention route's context: text embeddings [B, L, D] -> [B, 1 + L, width].

  The tokens are LayerNorm'd and projected once to the width of the blocks that attend
  to them (in `dtype`); a learned null token is prepended and is always attendable, so
  a caption without tokens (null conditioning) still has a well-defined attention
  output. Returns the context and its key mask, bool [B, 1 + L].
  """
  width: int
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, embedding: jax.Array, mask: jax.Array) -> tuple[jax.Array, jax.Array]:
    batch = embedding.shape[0]
    # Padding is zeroed before the projection so that even non-finite padding values
    # cannot reach the attention output (a masked key has weight 0, but 0 * nan = nan).
    tokens = jnp.where((mask > 0)[..., None], text_layer_norm(embedding), 0.0)
    tokens = dense(self.width, ("text", "embed"), dtype=self.dtype, name="proj")(
        tokens.astype(self.dtype))
    null = self.param("null", nn.with_logical_partitioning(nn.initializers.normal(1.0),
                                                           ("embed",)),
                      (self.width,), jnp.float32)
    null = jnp.broadcast_to(null.astype(tokens.dtype), (batch, 1, self.width))
    context = constrain_batch(jnp.concatenate([null, tokens], axis=1))
    context_mask = jnp.concatenate([jnp.ones((batch, 1), bool), mask > 0], axis=1)
    return context, constrain_batch(context_mask)


class Conditioning(nn.Module):
  """logSNR (and class label or pooled text, and segment layout) -> conditioning vector
  [B, emb_dim], float32.

  The logSNR features go through a two-layer swish MLP; with `num_classes > 0`
  a learned embedding of the label (index `num_classes` is the null class used
  for classifier-free guidance) is added, as the class embedding of ADM /
  simple diffusion is. With `pooled_text`, `labels` is the text dict of a
  text-conditioned model and `PooledText` of it is added instead. Everything
  here runs in float32 (the time embedding is the input whose precision matters
  most near t = 0).

  Any-step Multistep CMs also tell the network which segment layout it serves
  (`segment_cond`): "steps" adds a learned embedding of the step-count index
  (`segment` int [B] in [0, num_step_values)); "segment_start" adds a projection of
  the logSNR features of the segment start t_step (`segment` float [B], the logSNR at
  t_step; the data end t_step = 0 is the schedule's maximum logSNR). Both start at
  zero, so a student initialised from a diffusion checkpoint starts as the teacher.

  A guidance-conditioned student (`guidance_cond`) is told the
  classifier-free guidance scale w its teacher was guided at (`guidance` float [B]):
  a projection of sinusoidal features of w is added, zero-initialised for the same
  reason, so one student serves every w of its trained range.
  """
  emb_dim: int
  num_classes: int = 0
  num_features: int = 256
  segment_cond: str = "none"
  num_step_values: int = 0
  pooled_text: bool = False
  guidance_cond: bool = False

  @nn.compact
  def __call__(self, logsnr: jax.Array, labels: Any, segment: jax.Array | None = None,
               guidance: jax.Array | None = None) -> jax.Array:
    h = logsnr_features(logsnr, self.num_features)
    h = dense(self.emb_dim, ("cond_in", "cond"), dtype=jnp.float32, name="time_dense0")(h)
    h = dense(self.emb_dim, ("cond_in", "cond"), dtype=jnp.float32,
              name="time_dense1")(nn.swish(h))
    if self.num_classes > 0:
      if labels is None:
        labels = jnp.full(logsnr.shape, self.num_classes, dtype=jnp.int32)
      embed = nn.Embed(
          self.num_classes + 1, self.emb_dim, dtype=jnp.float32, param_dtype=jnp.float32,
          embedding_init=nn.with_logical_partitioning(
              nn.initializers.normal(stddev=1.0), ("vocab", "cond")),
          name="class_embed")
      h = h + embed(labels)
    if self.pooled_text:
      h = h + PooledText(self.emb_dim, name="text_pool")(labels["text_embedding"],
                                                          labels["text_mask"])
    if self.segment_cond != "none":
      if segment is None:
        raise ValueError(f"a model with segment_cond={self.segment_cond!r} needs `segment`")
      if self.segment_cond == "steps":
        h = h + nn.Embed(
            self.num_step_values, self.emb_dim, dtype=jnp.float32, param_dtype=jnp.float32,
            embedding_init=nn.with_logical_partitioning(nn.initializers.zeros,
                                                        ("vocab", "cond")),
            name="steps_embed")(segment.astype(jnp.int32))
      else:
        f = logsnr_features(segment.astype(jnp.float32), self.num_features)
        h = h + dense(self.emb_dim, ("cond_in", "cond"), dtype=jnp.float32, zero_init=True,
                      name="segment_dense")(f)
    if self.guidance_cond:
      if guidance is None:
        raise ValueError("a model with guidance_cond=True needs `guidance` (the scale w)")
      # The logSNR features' frequencies (1/64 to 256 per unit) also resolve w's range.
      f = logsnr_features(jnp.broadcast_to(guidance, logsnr.shape).astype(jnp.float32),
                          self.num_features)
      h = h + dense(self.emb_dim, ("cond_in", "cond"), dtype=jnp.float32, zero_init=True,
                    name="guidance_dense")(f)
    return h


def sincos_2d(height: int, width: int, channels: int) -> np.ndarray:
  """Fixed 2D sine-cosine position embedding [height * width, channels] (MAE-style).

  Half the channels encode the row, half the column; parameter-free, so it does
  not change parameter counts or need sharding.
  """
  if channels % 4:
    raise ValueError(f"sincos_2d needs channels divisible by 4, got {channels}")
  quarter = channels // 4
  omega = 1.0 / 10000.0 ** (np.arange(quarter) / quarter)

  def axis_embed(pos: Sequence[float]) -> np.ndarray:
    angles = np.asarray(pos, dtype=np.float64)[:, None] * omega[None, :]
    return np.concatenate([np.sin(angles), np.cos(angles)], axis=1)

  rows, cols = np.meshgrid(np.arange(height), np.arange(width), indexing="ij")
  emb = np.concatenate([axis_embed(rows.ravel()), axis_embed(cols.ravel())], axis=1)
  return emb.astype(np.float32)
