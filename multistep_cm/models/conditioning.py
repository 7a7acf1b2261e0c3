"""What a denoiser is conditioned on, as one pytree: class labels or text embeddings.

A class-conditional model takes `labels` int32 `[B]` (index `num_classes` is the null
class). A text-conditioned UViT (`text_dim > 0`) takes, in the same argument, the dict
`{"text_embedding": float32 [B, L, D], "text_mask": int32 [B, L]}` (mask 1 = a real token,
0 = padding); its null conditioning is the same dict with no tokens (the model answers it
with a learned null, models/uvit.py). Everything that builds, drops, guides or batches the
conditioning goes through here, so the trainer, the samplers and the evaluators treat both
kinds alike:
  * `from_batch`: the conditioning of a training batch;
  * `null_like`: the unconditional input of the same shape (classifier-free guidance, §5.5);
  * `drop`: conditioning dropout, per example, during diffusion pretraining;
  * `batch_size`: the leading dimension of a conditioning pytree;
  * `batch_specs`: the abstract batch entries a compiled train step takes.
"""
from typing import Any

import jax
import jax.numpy as jnp

TEXT_KEYS = ("text_embedding", "text_mask")


def is_text(model) -> bool:
  """Whether `model` is conditioned on text embeddings."""
  return getattr(model, "text_dim", 0) > 0


def is_conditional(model) -> bool:
  """Whether `model` takes class labels or text (so guidance and dropout apply)."""
  return is_text(model) or getattr(model, "num_classes", 0) > 0


def from_batch(model, batch) -> Any:
  """The model's conditioning input from a batch: the text dict, the labels, or None.

  Raises:
    KeyError: a text model's batch has no text embeddings (one line naming the keys).
  """
  if is_text(model):
    missing = [k for k in TEXT_KEYS if k not in batch]
    if missing:
      raise KeyError(f"a text-conditioned model needs batch keys {TEXT_KEYS}; missing "
                     f"{missing} (have {sorted(batch)})")
    return {k: batch[k] for k in TEXT_KEYS}
  if getattr(model, "num_classes", 0):
    return batch.get("label")
  return None


def null_like(model, cond) -> Any:
  """The unconditional input with `cond`'s shapes: no text tokens, or the null class."""
  if cond is None:
    return None
  if is_text(model):
    return {"text_embedding": jnp.zeros_like(cond["text_embedding"]),
            "text_mask": jnp.zeros_like(cond["text_mask"])}
  return jnp.full_like(jnp.asarray(cond, jnp.int32), model.num_classes)


def drop(key, model, cond, rate: float) -> Any:
  """Replaces each example's conditioning by the null one with probability `rate`."""
  if cond is None or rate <= 0:
    return cond
  keep = ~jax.random.bernoulli(key, rate, (batch_size(cond),))
  null = null_like(model, cond)
  return jax.tree.map(
      lambda c, n: jnp.where(keep.reshape((-1,) + (1,) * (c.ndim - 1)), c, n), cond, null)


def batch_size(cond) -> int:
  """The leading (batch) dimension of a conditioning pytree."""
  return jax.tree.leaves(cond)[0].shape[0]


def batch_specs(model, batch: int, sharding=None) -> dict[str, jax.ShapeDtypeStruct]:
  """The conditioning entries of an abstract training batch: `label`, plus the text keys for
  a text model (`[B, text_len, text_dim]` float32 and `[B, text_len]` int32)."""
  specs = {"label": jax.ShapeDtypeStruct((batch,), jnp.int32, sharding=sharding)}
  if is_text(model):
    length, width = int(model.text_len), int(model.text_dim)
    specs["text_embedding"] = jax.ShapeDtypeStruct((batch, length, width), jnp.float32,
                                                   sharding=sharding)
    specs["text_mask"] = jax.ShapeDtypeStruct((batch, length), jnp.int32, sharding=sharding)
  return specs
