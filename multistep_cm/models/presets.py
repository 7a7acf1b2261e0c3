"""Named model presets and `get_model`, the one way the rest of the code builds a network.

The four ImageNet presets follow §7.2 of docs/maths.md (widths, depths, resolutions and
dropout placement as the paper states them); `t2i_512` is the text-to-image
model, conditioned on precomputed T5-XXL-width token embeddings (the encoder runs
offline; docs/maths.md §15 states the text-conditioning assumptions). The small presets are
for CPU work and tests; `digits8_text` is the text-conditioned one.
"""
import dataclasses
from collections.abc import Mapping
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from multistep_cm.models import mlp
from multistep_cm.models import uvit

ARCHITECTURES = {"uvit": uvit.UViT, "mlp": mlp.MLPDenoiser}

# §7.2, ImageNet64 small: 3 Res @256 (64^2), 3 Transformer @512 (32^2), mid 16 @1024 (16^2),
# dropout 0.2 in the mid only.
_IMAGENET64_SMALL = dict(
    arch="uvit", image_size=64, num_channels=3, num_classes=1000,
    block_types=("res", "attn"), channels=(256, 512), num_blocks=(3, 3),
    mid_channels=1024, mid_blocks=16, dropout=(0.0, 0.0, 0.2),
    emb_dim=2048, head_dim=128, mlp_ratio=4, num_groups=32)
# §7.2, ImageNet128 small: an extra outer stage of 3 Res @128 at 128^2; dropout 0.1, mid only.
_IMAGENET128_SMALL = dict(
    _IMAGENET64_SMALL, image_size=128, block_types=("res", "res", "attn"),
    channels=(128, 256, 512), num_blocks=(3, 3, 3), dropout=(0.0, 0.0, 0.0, 0.1))
_DIGITS8 = dict(
    arch="uvit", image_size=8, num_channels=1, num_classes=10,
    block_types=("res",), channels=(32,), num_blocks=(2,), mid_channels=128,
    mid_blocks=2, dropout=(0.0, 0.1), emb_dim=128, head_dim=32, mlp_ratio=4,
    num_groups=8)

PRESETS: dict[str, dict[str, Any]] = {
    "imagenet64_small": _IMAGENET64_SMALL,
    # §7.2: all channels x2; dropout 0.1 on all transformer blocks.
    "imagenet64_large": dict(_IMAGENET64_SMALL, channels=(512, 1024), mid_channels=2048,
                             dropout=(0.0, 0.1, 0.1)),
    "imagenet128_small": _IMAGENET128_SMALL,
    # §7.2: channels x2; dropout 0.1 on all blocks except those at 128x128.
    "imagenet128_large": dict(_IMAGENET128_SMALL, channels=(256, 512, 1024),
                              mid_channels=2048, dropout=(0.0, 0.1, 0.1, 0.1)),
    # §7.2, T2I 512^2: Res @128/256/1024, Transformer @2048, mid 16 @4096, dropout 0.1 (mid).
    # Text: text_dim 4096 (T5-XXL's width) and text_len 128 tokens are our choice (the
    # paper names no encoder); text_route stays the UViT default, "both".
    "t2i_512": dict(
        _IMAGENET64_SMALL, image_size=512, num_classes=0,
        block_types=("res", "res", "res", "attn"), channels=(128, 256, 1024, 2048),
        num_blocks=(3, 3, 3, 3), mid_channels=4096, dropout=(0.0, 0.0, 0.0, 0.0, 0.1),
        text_dim=4096, text_len=128),
    # CPU presets: the embedded digits at 8x8 and 16x16, a 32x32 RGB model.
    "digits8": _DIGITS8,
    # digits8 conditioned on 8 tokens of 64-wide text embeddings (the captioned digits demo).
    "digits8_text": dict(_DIGITS8, num_classes=0, text_dim=64, text_len=8),
    "digits16": dict(
        arch="uvit", image_size=16, num_channels=1, num_classes=10,
        block_types=("res", "attn"), channels=(16, 64), num_blocks=(1, 1), mid_channels=128,
        mid_blocks=2, dropout=(0.0, 0.0, 0.1), emb_dim=128, head_dim=32, mlp_ratio=4,
        num_groups=8),
    "small32": dict(
        arch="uvit", image_size=32, num_channels=3, num_classes=10,
        block_types=("res", "res", "attn"), channels=(64, 128, 256), num_blocks=(2, 2, 2),
        mid_channels=256, mid_blocks=4, dropout=(0.0, 0.0, 0.1, 0.1), emb_dim=256,
        head_dim=64, mlp_ratio=4, num_groups=32),
    "mlp_toy": dict(arch="mlp", data_dim=8, num_classes=0, width=256, depth=4, mlp_ratio=2,
                    emb_dim=128, dropout=0.0),
}

# Parameter counts stated by the paper (§7.2).
PAPER_PARAMS = {
    "imagenet64_small": 394e6,
    "imagenet64_large": 1.23e9,
    "imagenet128_small": 397e6,
    "imagenet128_large": 1.25e9,
}

_DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}


def _module_fields(cls) -> list[str]:
  return [f.name for f in dataclasses.fields(cls) if f.name not in ("parent", "name")]


def _normalise(key: str, value: Any) -> Any:
  """Turns config values (lists, dtype names, a scalar dropout) into module attributes."""
  if key == "dtype":
    if isinstance(value, str):
      if value not in _DTYPES:
        raise ValueError(f"dtype must be one of {sorted(_DTYPES)}, got {value!r}")
      return _DTYPES[value]
    return value
  if isinstance(value, (list, tuple)):
    return tuple(value)
  return value


def get_model(preset_or_config: "str | Mapping[str, Any]", **overrides) -> nn.Module:
  """Builds a denoiser from a preset name, or a config with `preset` plus overrides.

  Args:
    preset_or_config: a key of `PRESETS`, or a mapping (e.g. `ml_collections.ConfigDict`)
      with key `preset` and optional module attributes to override.
    **overrides: more attribute overrides; they win over the config's.

  Returns:
    An unbound `UViT` or `MLPDenoiser`. A scalar `dropout` for a UViT applies
    the same rate at every level that the preset gives dropout (other levels
    stay at 0); a tuple sets every level and then the mid stack explicitly.

  Raises:
    ValueError: unknown preset or attribute (the message lists what is
      allowed), or an inconsistent combination.
  """
  if isinstance(preset_or_config, str):
    name, config_overrides = preset_or_config, {}
  else:
    config = dict(preset_or_config.to_dict() if hasattr(preset_or_config, "to_dict")
                  else preset_or_config)
    if "preset" not in config:
      raise ValueError(f"model config needs a 'preset' key (one of {sorted(PRESETS)}), "
                       f"got keys {sorted(config)}")
    name = config.pop("preset")
    config_overrides = config
  if name not in PRESETS:
    raise ValueError(f"unknown model preset {name!r}; allowed: {sorted(PRESETS)}")
  hparams = dict(PRESETS[name])
  cls = ARCHITECTURES[hparams.pop("arch")]
  allowed = _module_fields(cls)
  for key, value in {**config_overrides, **overrides}.items():
    if key not in allowed:
      raise ValueError(f"unknown model override {key!r} for preset {name!r}; "
                       f"allowed: {allowed}")
    value = _normalise(key, value)
    if key == "dropout" and cls is uvit.UViT and np.ndim(value) == 0:
      # Keep the paper's placement (§7.2) and change only the rate.
      value = tuple(float(value) if r > 0 else 0.0 for r in hparams["dropout"])
    hparams[key] = value
  model = cls(**hparams)
  model.validate()
  return model


def get_model_for_config(config: Any) -> nn.Module:
  """The model of an experiment config: `config.model` with the data's shape filled in.

  `config.data` may give `image_size`, `num_channels`, `num_classes`, `text_dim`,
  `text_len` (UViT) or `data_dim`, `num_classes` (MLP); each present key overrides the
  preset's.
  """
  model_config = dict(config.model.to_dict() if hasattr(config.model, "to_dict")
                      else config.model)
  preset = model_config.get("preset")
  if preset not in PRESETS:
    raise ValueError(f"config.model.preset must be one of {sorted(PRESETS)}, got {preset!r}")
  allowed = _module_fields(ARCHITECTURES[PRESETS[preset]["arch"]])
  # A model-only config (the summary command's, some tests') has no data section.
  data = config["data"] if "data" in config else {}
  from_data = {k: data[k] for k in ("image_size", "num_channels", "num_classes", "data_dim",
                                    "text_dim", "text_len")
               if k in data and k in allowed}
  return get_model({**model_config, **from_data})


def input_specs(model: nn.Module, batch: int) -> tuple[Any, ...]:
  """Abstract `(z, logsnr, labels)` for `model` at batch size `batch`; a text model's
  labels are the text dict at its `text_len` (models/uvit.py)."""
  if isinstance(model, mlp.MLPDenoiser) or getattr(model, "data_dim", 0):
    z_shape = (batch, model.data_dim)
  else:
    z_shape = (batch, model.image_size, model.image_size, model.num_channels)
  if getattr(model, "text_dim", 0) > 0:
    labels = {"text_embedding": jax.ShapeDtypeStruct((batch, model.text_len, model.text_dim),
                                                     jnp.float32),
              "text_mask": jax.ShapeDtypeStruct((batch, model.text_len), jnp.int32)}
  else:
    labels = jax.ShapeDtypeStruct((batch,), jnp.int32)
  return (jax.ShapeDtypeStruct(z_shape, jnp.float32),
          jax.ShapeDtypeStruct((batch,), jnp.float32), labels)


def dummy_inputs(model_or_preset: "nn.Module | str", batch: int):
  """Concrete zero inputs `(z, logsnr, labels)`; labels are the null conditioning (the
  null class, or for a text model zero embeddings with an all-zero mask)."""
  model = get_model(model_or_preset) if isinstance(model_or_preset, str) else model_or_preset
  z, logsnr, labels = input_specs(model, batch)
  if isinstance(labels, dict):
    labels = {k: jnp.zeros(v.shape, v.dtype) for k, v in labels.items()}
  else:
    labels = jnp.full(labels.shape, model.num_classes, labels.dtype)
  return jnp.zeros(z.shape, z.dtype), jnp.zeros(logsnr.shape, logsnr.dtype), labels


def init_kwargs(model: nn.Module, batch: int) -> dict[str, Any]:
  """Keyword inputs beyond (z, logsnr, labels) that `model.init` needs: a dummy segment
  for models conditioned on the segment layout, a dummy guidance scale for models told
  it (layers.Conditioning)."""
  out = {}
  kind = getattr(model, "segment_cond", "none")
  if kind != "none":
    out["segment"] = jnp.zeros((batch,), jnp.int32 if kind == "steps" else jnp.float32)
  if getattr(model, "guidance_cond", False):
    out["guidance"] = jnp.zeros((batch,), jnp.float32)
  return out


def abstract_variables(model: nn.Module, batch: int = 1) -> Any:
  """`jax.eval_shape` of `model.init`: boxed ShapeDtypeStructs, nothing allocated."""
  return jax.eval_shape(
      lambda key, *inputs: model.init({"params": key}, *inputs, train=False,
                                      **init_kwargs(model, batch)),
      jax.random.key(0), *input_specs(model, batch))


def param_count(model: nn.Module) -> int:
  """Number of parameters, from shapes only."""
  params = nn.meta.unbox(abstract_variables(model)["params"])
  return int(sum(np.prod(p.shape) for p in jax.tree.leaves(params)))
