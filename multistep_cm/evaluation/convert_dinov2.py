"""Converts published DINOv2 PyTorch weights to this package's `.npz` format.

  python -m multistep_cm.evaluation.convert_dinov2 \\
      --src=dinov2_vitl14_pretrain.pth --out=dinov2_vitl14.npz

The source is a state dict of either naming: the authors' torch hub checkpoints
(`dinov2_vit{s,b,l,g}14_pretrain.pth`: `blocks.N.attn.qkv`, `blocks.N.ls1.gamma`, ...),
or a HuggingFace `Dinov2Model` (`model.safetensors` or `pytorch_model.bin` of
facebook/dinov2-*, `encoder.layer.N.attention.attention.query` and the like, or
transformers 5's `attention.q_proj`). Fetch it yourself; nothing here downloads. A
`.safetensors` file is read with numpy; `.pth` and `.bin` need torch (a CPU build).

The shape comes from the arrays (width, depth, patch, MLP or SwiGLU, the position grid);
the head count cannot, and is `--heads` (default width / 64, true of every published
size). `--interpolate_offset` is how position embeddings are resized (the torch hub's 0.1,
which EDM2's FD-DINOv2 uses, or 0 as HuggingFace's model does); it is recorded with the
weights, so the features are the same wherever the file is used.

Mapping: HuggingFace names are first renamed to the hub's, their q, k and v (and SwiGLU
gate and up) projections concatenated as the hub fuses them; then hub module paths become
Flax paths with "/" for "." (`blocks.3` -> `blocks_3`), Linear weights are transposed, the
patch conv goes from [out, in, kh, kw] to [kh, kw, in, out], LayerNorm weight becomes
scale. Every Flax variable is filled exactly once and every source entry is used, except
`mask_token` (masked-image training only). Bad input is one line `convert_dinov2: error:
...` and exit 2 (docs/operations.md).
"""
import argparse
import math
import os
import re
import sys
from typing import Any, Mapping, Sequence

import numpy as np

from multistep_cm.evaluation import dinov2
from multistep_cm.evaluation import tree_io

# HuggingFace name (after "encoder.layer.N.") -> hub name (after "blocks.N."), one to one.
_HF_LAYER_RENAMES = {
    "norm1.": "norm1.", "norm2.": "norm2.",
    "layer_scale1.lambda1": "ls1.gamma", "layer_scale2.lambda1": "ls2.gamma",
    "attention.output.dense.": "attn.proj.", "attention.o_proj.": "attn.proj.",
    "mlp.fc1.": "mlp.fc1.", "mlp.fc2.": "mlp.fc2.",
    "mlp.weights_in.": "mlp.w12.", "mlp.weights_out.": "mlp.w3.", "mlp.down_proj.": "mlp.w3.",
}
# HuggingFace names the hub fuses, in the order of the fused output rows.
_HF_FUSED = {
    "attn.qkv.": (("attention.attention.query.", "attention.attention.key.",
                   "attention.attention.value."),
                  ("attention.q_proj.", "attention.k_proj.", "attention.v_proj.")),
    "mlp.w12.": (("mlp.gate_proj.", "mlp.up_proj."),),
}
# HuggingFace prefix -> (hub name, its index among the fused parts, how many parts).
_HF_FUSED_PARTS = {prefix: (fused, index, len(naming))
                   for fused, namings in _HF_FUSED.items() for naming in namings
                   for index, prefix in enumerate(naming)}
_HF_TOP = {
    "embeddings.cls_token": "cls_token", "embeddings.mask_token": "mask_token",
    "embeddings.position_embeddings": "pos_embed",
    "embeddings.patch_embeddings.projection.weight": "patch_embed.proj.weight",
    "embeddings.patch_embeddings.projection.bias": "patch_embed.proj.bias",
    "layernorm.weight": "norm.weight", "layernorm.bias": "norm.bias",
}
_IGNORED = ("mask_token",)
_HF_LAYER = re.compile(r"encoder\.layer\.(\d+)\.(.*)$")


class ConversionError(ValueError):
  """The source is not a DINOv2 state dict this converter knows."""


def _hf_layer_to_hub(rest: str) -> str | None:
  for hf, hub in _HF_LAYER_RENAMES.items():
    if rest.startswith(hf):
      return hub + rest[len(hf):]
  return None


def to_hub_names(state_dict: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
  """A HuggingFace `Dinov2Model` state dict renamed (and fused) to the hub's names; a hub
  state dict is returned as it is. Raises ConversionError on names of neither."""
  if not any(k.startswith("encoder.layer.") for k in state_dict):
    return dict(state_dict)
  out, unknown, parts = {}, [], {}
  for name, value in state_dict.items():
    if name in _HF_TOP:
      out[_HF_TOP[name]] = value
      continue
    match = _HF_LAYER.match(name)
    if not match:
      unknown.append(name)
      continue
    layer, rest = match.groups()
    hub = _hf_layer_to_hub(rest)
    if hub is not None:
      out[f"blocks.{layer}.{hub}"] = value
      continue
    prefix = next((p for p in _HF_FUSED_PARTS if rest.startswith(p)), None)
    if prefix is None:
      unknown.append(name)
      continue
    fused, index, count = _HF_FUSED_PARTS[prefix]
    pieces = parts.setdefault((layer, fused, rest[len(prefix):], count), {})
    pieces[index] = value
  for (layer, fused, leaf, count), pieces in parts.items():
    if len(pieces) != count:
      unknown.append(f"encoder.layer.{layer}: {count - len(pieces)} of the parts of {fused}{leaf}"
                     " missing")
      continue
    out[f"blocks.{layer}.{fused}{leaf}"] = np.concatenate([pieces[i] for i in range(count)])
  if unknown:
    raise ConversionError(f"not a DINOv2 state dict: unknown entries {unknown[:5]}")
  return out


def infer_config(hub: Mapping[str, np.ndarray], heads: int | None = None,
                 interpolate_offset: float = dinov2.HUB_INTERPOLATE_OFFSET
                 ) -> dinov2.Dinov2Config:
  """The network's shape from the arrays of a hub-named state dict."""
  needed = ("cls_token", "pos_embed", "patch_embed.proj.weight", "blocks.0.norm1.weight")
  missing = [k for k in needed if k not in hub]
  if missing:
    raise ConversionError(f"not a DINOv2 state dict: missing {missing} (has "
                          f"{sorted(hub)[:5]})")
  hidden = int(hub["cls_token"].shape[-1])
  layers = len({k.split(".")[1] for k in hub if k.startswith("blocks.")})
  grid = math.isqrt(int(hub["pos_embed"].shape[1]) - 1)
  if grid * grid + 1 != hub["pos_embed"].shape[1]:
    raise ConversionError(f"pos_embed has {hub['pos_embed'].shape[1]} rows, not 1 + a square")
  swiglu = "blocks.0.mlp.w12.weight" in hub
  mlp = hub["blocks.0.mlp.w3.weight" if swiglu else "blocks.0.mlp.fc1.weight"]
  mlp_hidden = int(mlp.shape[1] if swiglu else mlp.shape[0])
  heads = heads or hidden // 64
  if heads <= 0 or hidden % heads:
    raise ConversionError(f"--heads={heads} does not divide the width {hidden}")
  return dinov2.Dinov2Config(hidden, layers, heads, mlp_hidden, swiglu,
                             int(hub["patch_embed.proj.weight"].shape[-1]), grid,
                             float(interpolate_offset))


def hub_name(flax_path: str) -> str:
  """"params/blocks_3/attn/qkv/kernel" -> "blocks.3.attn.qkv.weight"."""
  _, *modules, leaf = flax_path.split("/")
  modules = [re.sub(r"^blocks_(\d+)$", r"blocks.\1", m) for m in modules]
  if modules == ["patch_embed"]:
    modules = ["patch_embed", "proj"]
  if not modules:  # cls_token, pos_embed
    return leaf
  return ".".join(modules + [{"kernel": "weight", "scale": "weight"}.get(leaf, leaf)])


def to_flax_layout(flax_path: str, value: np.ndarray) -> np.ndarray:
  if flax_path.endswith("/kernel"):
    return value.transpose(2, 3, 1, 0) if value.ndim == 4 else value.T
  return value


def convert_state_dict(state_dict: Mapping[str, np.ndarray], heads: int | None = None,
                       interpolate_offset: float = dinov2.HUB_INTERPOLATE_OFFSET
                       ) -> tuple[dinov2.Dinov2Config, dict[str, Any]]:
  """A hub or HuggingFace DINOv2 state dict (numpy values) -> (config, Flax variables).

  Raises:
    ConversionError: an entry is unknown, missing, left over or of the wrong shape.
  """
  hub = to_hub_names(state_dict)
  config = infer_config(hub, heads, interpolate_offset)
  flat, problems = tree_io.fill_from_state_dict(dinov2.variable_shapes(config), hub, hub_name,
                                                 to_flax_layout, lambda name: name in _IGNORED)
  if problems:
    raise ConversionError("state dict does not match a DINOv2 ViT: " + "; ".join(problems[:5]))
  return config, tree_io.unflatten(flat)


def read_state_dict(path: str) -> dict[str, np.ndarray]:
  """numpy arrays from a `.safetensors` (numpy only) or a torch `.pth` / `.bin`."""
  if not os.path.isfile(path):
    raise ConversionError(f"--src={path}: no such file")
  if path.endswith(".safetensors"):
    try:
      from safetensors import numpy as safetensors_numpy  # pylint: disable=g-import-not-at-top
    except ImportError:
      raise ConversionError("reading a .safetensors file needs the safetensors package: pip "
                            "install safetensors") from None
    try:
      return dict(safetensors_numpy.load_file(path))
    except Exception as e:  # pylint: disable=broad-except
      raise ConversionError(f"--src={path}: not a readable safetensors file ({e})") from None
  try:
    import torch  # pylint: disable=g-import-not-at-top
  except ImportError:
    raise ConversionError("reading a .pth or .bin needs torch (a CPU build is enough): pip "
                          "install torch; or convert the .safetensors file") from None
  try:
    state_dict = torch.load(path, map_location="cpu", weights_only=True)
  except Exception as e:  # pylint: disable=broad-except
    raise ConversionError(f"--src={path}: not a torch state dict ({type(e).__name__})") from None
  if not isinstance(state_dict, Mapping):
    raise ConversionError(f"--src={path}: holds a {type(state_dict).__name__}, not a state dict")
  return {k: v.detach().float().cpu().numpy() for k, v in state_dict.items()}


def convert_file(src: str, out: str, heads: int | None = None,
                 interpolate_offset: float = dinov2.HUB_INTERPOLATE_OFFSET) -> dict[str, Any]:
  """Reads the weights at `src`, writes the `.npz` at `out`; returns its metadata."""
  config, variables = convert_state_dict(read_state_dict(src), heads, interpolate_offset)
  dinov2.save_dinov2(out, config, variables, source=os.path.basename(src),
                     source_sha256=tree_io.file_sha256(src))
  return tree_io.load(out)[1]


def fail(message: str, code: int = 2, command: str = "convert_dinov2"):
  """One line `<command>: error: message` on stderr and exit `code`."""
  print(f"{command}: error: {message}", file=sys.stderr)
  sys.exit(code)


def main(argv: Sequence[str] | None = None):
  parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
  parser.error = fail  # one line, exit 2, like every other bad input
  parser.add_argument("--src", required=True, help="hub .pth, or HuggingFace .safetensors/.bin")
  parser.add_argument("--out", required=True, help="output .npz, e.g. dinov2_vitl14.npz")
  parser.add_argument("--heads", type=int, default=None,
                      help="attention heads (default width / 64, as every published size)")
  parser.add_argument("--interpolate_offset", type=float,
                      default=dinov2.HUB_INTERPOLATE_OFFSET,
                      help="position-embedding resize: 0.1 as the torch hub (EDM2), 0 as "
                      "HuggingFace")
  args = parser.parse_args(argv)
  try:
    metadata = convert_file(args.src, args.out, args.heads, args.interpolate_offset)
  except ConversionError as e:
    fail(str(e))
  except OSError as e:
    fail(f"--out={args.out}: cannot write ({e.strerror or e})", 6)
  print(f"wrote {args.out}: {metadata['network']}, weights sha256 "
        f"{metadata['weights_sha256'][:12]}")


if __name__ == "__main__":
  main()
