"""Converts a HuggingFace `CLIPModel` state dict to this package's `.npz` format.

  python -m multistep_cm.evaluation.convert_clip --src=model.safetensors --out=clip_l14.npz

The source is the `model.safetensors` (numpy only) or `pytorch_model.bin` (needs torch) of
a HuggingFace CLIP checkpoint such as openai/clip-vit-large-patch14 or
openai/clip-vit-base-patch16; fetch it yourself, nothing here downloads. The shape comes
from the arrays; the head counts cannot, and are `--vision_heads` / `--text_heads`
(default width / 64, true of OpenAI's models).

Mapping: `vision_model.` / `text_model.` become the `vision` / `text` towers,
`encoder.layers.N.` becomes `layers_N/` (its `mlp.fc1` just `fc1`), Linear weights are
transposed, the patch conv goes from [out, in, kh, kw] to [kh, kw, in, out], LayerNorm
weight becomes scale, an Embedding's weight its embedding table. Every Flax variable is
filled once and every entry used, except `logit_scale` and `position_ids` buffers. Bad
input is one line `convert_clip: error: ...` and exit 2.
"""
import argparse
import math
import os
import re
from typing import Any, Mapping, Sequence

import numpy as np

from multistep_cm.evaluation import clip
from multistep_cm.evaluation import convert_dinov2
from multistep_cm.evaluation import tree_io

_TOWERS = {"vision": "vision_model", "text": "text_model"}
_IGNORED = re.compile(r"(logit_scale|.*position_ids)$")


def hf_name(flax_path: str) -> str:
  """"params/vision/layers_3/self_attn/q_proj/kernel" ->
  "vision_model.encoder.layers.3.self_attn.q_proj.weight"."""
  _, tower, *modules, leaf = flax_path.split("/")
  prefix = _TOWERS[tower]
  name = "bias" if leaf == "bias" else "weight"
  if not modules:  # class_embedding, position_embedding: parameters of the tower
    return f"{prefix}.embeddings.{leaf}" + (".weight" if leaf == "position_embedding" else "")
  head, rest = modules[0], modules[1:]
  if head in ("visual_projection", "text_projection"):
    return f"{head}.weight"
  if head in ("patch_embedding", "token_embedding"):
    return f"{prefix}.embeddings.{head}.weight"
  layer = re.fullmatch(r"layers_(\d+)", head)
  if layer:
    mlp = "mlp." if rest[0] in ("fc1", "fc2") else ""
    return f"{prefix}.encoder.layers.{layer.group(1)}.{mlp}{'.'.join(rest)}.{name}"
  return f"{prefix}.{head}.{name}"


def to_flax_layout(flax_path: str, value: np.ndarray) -> np.ndarray:
  if flax_path.endswith("/kernel"):
    return value.transpose(2, 3, 1, 0) if value.ndim == 4 else value.T
  return value


def _tower(state_dict, prefix: str, heads: int | None) -> clip.TowerConfig:
  layers = {k.split(".")[3] for k in state_dict if k.startswith(f"{prefix}.encoder.layers.")}
  fc1 = state_dict.get(f"{prefix}.encoder.layers.0.mlp.fc1.weight")
  if not layers or fc1 is None:
    raise convert_dinov2.ConversionError(f"not a CLIPModel state dict: no {prefix}.encoder "
                                         "layers")
  hidden = int(fc1.shape[1])
  heads = heads or hidden // 64
  if heads <= 0 or hidden % heads:
    raise convert_dinov2.ConversionError(f"{heads} heads do not divide the {prefix} width "
                                         f"{hidden}")
  return clip.TowerConfig(hidden, len(layers), heads, int(fc1.shape[0]))


def infer_config(state_dict: Mapping[str, np.ndarray], vision_heads: int | None = None,
                 text_heads: int | None = None) -> clip.ClipConfig:
  needed = ("vision_model.embeddings.patch_embedding.weight",
            "vision_model.embeddings.position_embedding.weight",
            "text_model.embeddings.token_embedding.weight",
            "text_model.embeddings.position_embedding.weight", "visual_projection.weight")
  missing = [k for k in needed if k not in state_dict]
  if missing:
    raise convert_dinov2.ConversionError(f"not a CLIPModel state dict: missing {missing[:3]} "
                                         f"(has {sorted(state_dict)[:5]})")
  patch = int(state_dict[needed[0]].shape[-1])
  grid = math.isqrt(int(state_dict[needed[1]].shape[0]) - 1)
  vocab, _ = state_dict[needed[2]].shape
  return clip.ClipConfig(_tower(state_dict, "vision_model", vision_heads),
                         _tower(state_dict, "text_model", text_heads),
                         int(state_dict[needed[4]].shape[0]), patch=patch,
                         image_size=patch * grid, vocab_size=int(vocab),
                         context=int(state_dict[needed[3]].shape[0]))


def convert_state_dict(state_dict: Mapping[str, np.ndarray], vision_heads: int | None = None,
                       text_heads: int | None = None) -> tuple[clip.ClipConfig, dict[str, Any]]:
  """A HuggingFace CLIPModel state dict (numpy values) -> (config, Flax variables).

  Raises:
    ConversionError: an entry is missing, left over or of the wrong shape.
  """
  config = infer_config(state_dict, vision_heads, text_heads)
  flat, problems = tree_io.fill_from_state_dict(clip.variable_shapes(config), state_dict,
                                                hf_name, to_flax_layout,
                                                lambda name: bool(_IGNORED.match(name)))
  if problems:
    raise convert_dinov2.ConversionError("state dict does not match a CLIPModel: "
                                         + "; ".join(problems[:5]))
  return config, tree_io.unflatten(flat)


def main(argv: Sequence[str] | None = None):
  parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
  fail = lambda message, code=2: convert_dinov2.fail(message, code, command="convert_clip")
  parser.error = fail
  parser.add_argument("--src", required=True, help="HuggingFace CLIPModel .safetensors or .bin")
  parser.add_argument("--out", required=True, help="output .npz, e.g. clip_l14.npz")
  parser.add_argument("--vision_heads", type=int, default=None, help="default width / 64")
  parser.add_argument("--text_heads", type=int, default=None, help="default width / 64")
  args = parser.parse_args(argv)
  try:
    config, variables = convert_state_dict(convert_dinov2.read_state_dict(args.src),
                                           args.vision_heads, args.text_heads)
    clip.save_clip(args.out, config, variables, source=os.path.basename(args.src),
                   source_sha256=tree_io.file_sha256(args.src))
  except convert_dinov2.ConversionError as e:
    fail(str(e))
  except OSError as e:
    fail(f"--out={args.out}: cannot write ({e.strerror or e})", 6)
  print(f"wrote {args.out}: {clip.network_name(config)}")


if __name__ == "__main__":
  main()
