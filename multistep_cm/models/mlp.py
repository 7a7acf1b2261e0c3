"""A residual MLP denoiser for vector data (the toy experiments).

Same interface as the UViT: `__call__(z, logsnr, labels, train)` returns v-hat
with the shape of z ([B, data_dim], float32), conditioned on logSNR and
optionally on a class label (null class at index `num_classes`).

Layout: dense in -> `depth` pre-LN residual blocks (LayerNorm -> FiLM from the
conditioning vector -> dense (mlp_ratio x) -> swish -> dropout -> dense,
zero-initialised) -> LayerNorm -> dense out (zero-initialised, so v-hat = 0 at
initialisation). The same conditioning, precision and sharding conventions as
the UViT (see `layers.py`).
"""
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from multistep_cm.models import layers

Dtype = Any


class MLPBlock(nn.Module):
  """One pre-LN residual MLP block with FiLM conditioning."""
  width: int
  mlp_ratio: int = 2
  dropout: float = 0.0
  deterministic: bool = True
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, cond: jax.Array) -> jax.Array:
    x = layers.constrain_batch(x)
    h = layers.modulated_layer_norm(x, cond, name="norm").astype(self.dtype)
    h = layers.dense(self.mlp_ratio * self.width, ("embed", "mlp"), dtype=self.dtype,
                     name="dense0")(h)
    h = layers.dropout(nn.swish(h), self.dropout, self.deterministic)
    h = layers.dense(self.width, ("mlp", "embed"), dtype=self.dtype, zero_init=True,
                     name="dense1")(h)
    return x + h


class MLPDenoiser(nn.Module):
  """Residual MLP over [B, data_dim] vectors; returns v-hat [B, data_dim] float32.

  Attributes:
    data_dim: dimension of the data vectors.
    num_classes: 0 for an unconditional model (labels ignored), else the number
      of classes; index `num_classes` is the null class.
    width, depth, mlp_ratio: residual stream width, number of blocks, expansion.
    emb_dim: width of the conditioning vector.
    dropout: dropout rate inside every block.
    dtype: compute dtype of the dense layers (parameters stay float32).
    remat, remat_policy: rematerialise every block with a named policy.
    segment_cond, num_step_values: the segment-layout conditioning of any-step
      Multistep CMs (`layers.Conditioning`): "none", "steps" or "segment_start".
    guidance_cond: the student is told its teacher's guidance scale w
      (`layers.Conditioning`).
  """
  data_dim: int = 8
  num_classes: int = 0
  width: int = 256
  depth: int = 4
  mlp_ratio: int = 2
  emb_dim: int = 256
  dropout: float = 0.0
  dtype: Dtype = jnp.float32
  remat: bool = False
  remat_policy: str = "nothing_saveable"
  segment_cond: str = "none"
  num_step_values: int = 0
  guidance_cond: bool = False

  def validate(self):
    """Raises ValueError naming the first inconsistent attribute."""
    for key in ("data_dim", "width", "depth", "emb_dim"):
      if getattr(self, key) < 1:
        raise ValueError(f"{key} must be positive, got {getattr(self, key)}")
    layers.remat_policies(self.remat_policy, 1)  # one policy name: every block's
    layers.validate_segment_cond(self.segment_cond, self.num_step_values)

  @nn.compact
  def __call__(self, z: jax.Array, logsnr: jax.Array, labels: jax.Array | None = None,
               train: bool = False, segment: jax.Array | None = None,
               guidance: jax.Array | None = None) -> jax.Array:
    """v-hat [B, data_dim] float32 from z [B, data_dim], logsnr [B], labels [B] or None."""
    self.validate()
    cond = layers.Conditioning(self.emb_dim, self.num_classes, segment_cond=self.segment_cond,
                               num_step_values=self.num_step_values,
                               guidance_cond=self.guidance_cond,
                               name="cond")(logsnr, labels, segment, guidance)
    x = layers.constrain_batch(z.astype(self.dtype))
    x = layers.dense(self.width, ("fan_in", "embed"), dtype=self.dtype, name="dense_in")(x)
    block_cls = layers.maybe_remat(MLPBlock, self.remat, self.remat_policy)
    for i in range(self.depth):
      x = block_cls(self.width, mlp_ratio=self.mlp_ratio, dropout=self.dropout,
                    deterministic=not train, dtype=self.dtype, name=f"block{i}")(x, cond)
    x = nn.LayerNorm(epsilon=1e-6, dtype=jnp.float32,
                     scale_init=nn.with_logical_partitioning(nn.initializers.ones, ("norm",)),
                     bias_init=nn.with_logical_partitioning(nn.initializers.zeros, ("norm",)),
                     name="norm_out")(x)
    x = layers.dense(self.data_dim, ("embed", "channels"), dtype=self.dtype, zero_init=True,
                     name="dense_out")(x.astype(self.dtype))
    return x.astype(jnp.float32)
