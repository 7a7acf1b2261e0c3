"""CLIP's image and text towers in Flax linen, and the CLIP score of images against captions.

The network of Radford et al. 2021 as OpenAI released it (and transformers' `CLIPModel`
holds it): a ViT image tower (patch conv without bias, a class token, learned positions,
a LayerNorm before the blocks and one on the class token after them, a projection without
bias) and a causal text transformer (token and position embeddings, a final LayerNorm,
the state at the end-of-text token, a projection without bias); pre-norm blocks with
LayerNorm eps 1e-5 and quick GELU, x * sigmoid(1.702 x). The text feature is read at the
highest token id of each row, which is the end-of-text token, as OpenAI's code does.
Presets: ViT-L/14 and ViT-B/16 at 224 px (`PRESETS`).

The CLIP score of an image and its caption is 100 * max(cos(image, text), 0), averaged over
the pairs (Hessel et al. 2021, as torchmetrics' CLIPScore computes it). Images are
prepared as CLIP's processor does: the shorter side resized to 224 (PyTorch's
antialiased bicubic, a stand-in for PIL's), the centre 224x224 cropped, /255 and CLIP's
mean and std. Captions are tokenized by `clip_tokenizer`.
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

from multistep_cm.evaluation import dinov2
from multistep_cm.evaluation import inception
from multistep_cm.evaluation import tree_io

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
_HIGHEST = jax.lax.Precision.HIGHEST


@dataclasses.dataclass(frozen=True)
class TowerConfig:
  """One transformer tower's shape."""
  hidden: int
  layers: int
  heads: int
  mlp: int


@dataclasses.dataclass(frozen=True)
class ClipConfig:
  vision: TowerConfig
  text: TowerConfig
  projection: int
  patch: int = 14
  image_size: int = 224
  vocab_size: int = 49408
  context: int = 77  # text positions

  def to_dict(self) -> dict[str, Any]:
    return dataclasses.asdict(self)

  @classmethod
  def from_dict(cls, d) -> "ClipConfig":
    return cls(**{**d, "vision": TowerConfig(**d["vision"]), "text": TowerConfig(**d["text"])})


PRESETS = {
    "ViT-L/14": ClipConfig(TowerConfig(1024, 24, 16, 4096), TowerConfig(768, 12, 12, 3072), 768,
                           patch=14),
    "ViT-B/16": ClipConfig(TowerConfig(768, 12, 12, 3072), TowerConfig(512, 12, 8, 2048), 512,
                           patch=16),
}


def network_name(config: ClipConfig) -> str:
  size = next((k for k, v in PRESETS.items() if v == config),
              f"{config.vision.hidden}d-{config.vision.layers}x/{config.patch}")
  return f"CLIP {size} (projected image and text features)"


def quick_gelu(x):
  return x * jax.nn.sigmoid(1.702 * x)


class Attention(nn.Module):
  """Multi-head attention with separate q, k, v projections (with bias), optionally causal."""
  heads: int
  causal: bool = False

  @nn.compact
  def __call__(self, x):
    n, t, d = x.shape
    split = lambda y: y.reshape(n, t, self.heads, d // self.heads)
    q, k, v = (split(nn.Dense(d, precision=_HIGHEST, name=f"{p}_proj")(x)) for p in "qkv")
    logits = jnp.einsum("nqhd,nkhd->nhqk", q, k, precision=_HIGHEST) / math.sqrt(q.shape[-1])
    if self.causal:
      logits = jnp.where(jnp.tril(jnp.ones((t, t), bool)), logits, -jnp.inf)
    weights = jax.nn.softmax(logits.astype(jnp.float32), axis=-1)
    out = jnp.einsum("nhqk,nkhd->nqhd", weights, v, precision=_HIGHEST).reshape(n, t, d)
    return nn.Dense(d, precision=_HIGHEST, name="out_proj")(out)


class Layer(nn.Module):
  """Pre-norm block: attention and a quick-GELU MLP, each added back."""
  config: TowerConfig
  causal: bool = False

  @nn.compact
  def __call__(self, x):
    c = self.config
    x = x + Attention(c.heads, self.causal, name="self_attn")(
        nn.LayerNorm(1e-5, name="layer_norm1")(x))
    h = nn.LayerNorm(1e-5, name="layer_norm2")(x)
    h = nn.Dense(c.mlp, precision=_HIGHEST, name="fc1")(h)
    return x + nn.Dense(c.hidden, precision=_HIGHEST, name="fc2")(quick_gelu(h))


class VisionTower(nn.Module):
  """[N, S, S, 3] from `preprocess` -> projected image features [N, projection]."""
  config: ClipConfig

  @nn.compact
  def __call__(self, x):
    c, v = self.config, self.config.vision
    x = nn.Conv(v.hidden, (c.patch, c.patch), strides=c.patch, padding="VALID", use_bias=False,
                precision=_HIGHEST, name="patch_embedding")(x)
    n = x.shape[0]
    x = x.reshape(n, -1, v.hidden)
    cls = self.param("class_embedding", nn.initializers.normal(1.0), (v.hidden,))
    x = jnp.concatenate([jnp.broadcast_to(cls, (n, 1, v.hidden)), x], axis=1)
    pos = self.param("position_embedding", nn.initializers.normal(0.02),
                     (1 + (c.image_size // c.patch) ** 2, v.hidden))
    if x.shape[1] != pos.shape[0]:
      raise ValueError(f"{x.shape[1] - 1} patches, but positions for {pos.shape[0] - 1}: "
                       f"images must be {c.image_size}x{c.image_size}")
    x = nn.LayerNorm(1e-5, name="pre_layrnorm")(x + pos)
    for i in range(v.layers):
      x = Layer(v, name=f"layers_{i}")(x)
    pooled = nn.LayerNorm(1e-5, name="post_layernorm")(x[:, 0])
    return nn.Dense(c.projection, use_bias=False, precision=_HIGHEST,
                    name="visual_projection")(pooled)


class TextTower(nn.Module):
  """int token ids [N, T] (T <= context; end-of-text the highest id of each row) ->
  projected text features [N, projection]."""
  config: ClipConfig

  @nn.compact
  def __call__(self, ids):
    c, t = self.config, self.config.text
    x = nn.Embed(c.vocab_size, t.hidden, name="token_embedding")(ids)
    pos = self.param("position_embedding", nn.initializers.normal(0.01), (c.context, t.hidden))
    x = x + pos[:ids.shape[1]]
    for i in range(t.layers):
      x = Layer(t, causal=True, name=f"layers_{i}")(x)
    x = nn.LayerNorm(1e-5, name="final_layer_norm")(x)
    pooled = x[jnp.arange(x.shape[0]), jnp.argmax(ids, axis=-1)]
    return nn.Dense(c.projection, use_bias=False, precision=_HIGHEST,
                    name="text_projection")(pooled)


class Clip(nn.Module):
  """Both towers; `image_features` and `text_features` are its methods."""
  config: ClipConfig

  def setup(self):
    self.vision = VisionTower(self.config)
    self.text = TextTower(self.config)

  def image_features(self, x):
    return self.vision(x)

  def text_features(self, ids):
    return self.text(ids)

  def __call__(self, x, ids):
    return self.vision(x), self.text(ids)


# --- Preprocessing and the score ---------------------------------------------------------------


def preprocess(images, config: ClipConfig, quantize: bool = True):
  """uint8 [N, H, W, C] (or float [-1, 1]) -> [N, S, S, 3]: the shorter side resized to S,
  the centre S x S cropped, /255, CLIP's mean and std (S = config.image_size)."""
  if images.ndim != 4 or images.shape[-1] not in (1, 3):
    raise ValueError(f"images must be [N, H, W, 1 or 3], got shape {images.shape}")
  x = inception.to_pixels(jnp.asarray(images), quantize)
  if x.shape[-1] == 1:
    x = jnp.repeat(x, 3, axis=-1)
  _, h, w, _ = x.shape
  size = config.image_size
  scale = size / min(h, w)
  new_h, new_w = max(size, round(h * scale)), max(size, round(w * scale))
  top, left = (new_h - size) // 2, (new_w - size) // 2
  rows = dinov2.antialiased_bicubic_matrix(h, new_h)[top:top + size]
  cols = dinov2.antialiased_bicubic_matrix(w, new_w)[left:left + size]
  x = jnp.einsum("yh,nhwc,xw->nyxc", jnp.asarray(rows, jnp.float32), x,
                 jnp.asarray(cols, jnp.float32), precision=_HIGHEST)
  return (x / 255.0 - jnp.asarray(CLIP_MEAN)) / jnp.asarray(CLIP_STD)


def clip_score(image_features, text_features) -> float:
  """mean over pairs of 100 * max(cos(image_i, text_i), 0)."""
  a = np.asarray(image_features, np.float64)
  b = np.asarray(text_features, np.float64)
  cos = np.sum(a * b, -1) / (np.linalg.norm(a, axis=-1) * np.linalg.norm(b, axis=-1))
  return float(np.mean(100.0 * np.maximum(cos, 0.0)))


# --- Parameters ---------------------------------------------------------------------------------


@functools.lru_cache(maxsize=None)
def variable_shapes(config: ClipConfig) -> dict[str, tuple[int, ...]]:
  size = config.image_size
  abstract = jax.eval_shape(Clip(config).init, jax.random.key(0),
                            jax.ShapeDtypeStruct((1, size, size, 3), jnp.float32),
                            jax.ShapeDtypeStruct((1, config.context), jnp.int32))
  return {"/".join(str(k.key) for k in path): tuple(leaf.shape)
          for path, leaf in jax.tree_util.tree_leaves_with_path(abstract)}


def save_clip(path: str, config: ClipConfig, variables, **metadata):
  """Writes `variables` where `load_clip` reads them, with the network's records."""
  tree_io.save(path, variables, {"network": network_name(config), "clip_config": config.to_dict(),
                                 "weights_sha256": tree_io.digest(variables), **metadata})


def load_clip(path: str) -> tuple[ClipConfig, dict[str, Any]]:
  """(config, variables) from a file written by `convert_clip`.

  Raises:
    FileNotFoundError: no such file (the message names the conversion command).
    ValueError: not a converted CLIP, or arrays that do not fit its config.
  """
  path = os.path.expanduser(path)
  if not os.path.exists(path):
    raise FileNotFoundError(
        f"CLIP weights not found at {path!r}. This code never downloads them: fetch a "
        "HuggingFace CLIPModel's model.safetensors (openai/clip-vit-large-patch14) yourself "
        "and convert it: python -m multistep_cm.evaluation.convert_clip --src=FILE "
        "--out=clip.npz")
  tree, metadata = tree_io.load(path)
  if "clip_config" not in metadata:
    raise ValueError(f"{path} is not a converted CLIP (network {metadata.get('network')!r})")
  config = ClipConfig.from_dict(metadata["clip_config"])
  flat = tree_io.flatten(tree)
  expected = variable_shapes(config)
  wrong = sorted(set(expected) ^ set(flat)) + [k for k in expected if k in flat
                                               and tuple(flat[k].shape) != expected[k]]
  if wrong:
    raise ValueError(f"{path} does not match CLIP {config}: {wrong[:5]}")
  return config, tree_io.unflatten({k: v.astype(np.float32) for k, v in flat.items()})
