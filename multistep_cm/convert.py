"""Converts published PyTorch weights of DiT, SiT, the SD VAE and EDM's ADM UNet to Flax
parameter files.

  python -m multistep_cm.convert --from=dit --src=DiT-XL-2-256x256.pt --out=dit_xl_2.safetensors
  python -m multistep_cm.convert --from=sit --src=SiT-XL-2-256x256.pt --out=sit_xl_2.safetensors
  python -m multistep_cm.convert --from=sd-vae --src=diffusion_pytorch_model.safetensors \\
      --out=sd_vae_ft_ema.safetensors
  python -m multistep_cm.convert --from=edm --src=edm_in64_adm.pt --out=edm_in64_adm.safetensors

EDM publishes pickles of its whole network object, which only EDM's own code unpickles. One
line run inside a checkout of github.com/NVlabs/edm exports its state dict:
`python -c "import pickle, torch; torch.save(pickle.load(open('edm-imagenet-64x64-cond-adm.pkl',
'rb'))['ema'].state_dict(), 'edm_in64_adm.pt')"`. The ADM UNet's settings are read from the
arrays (models/adm.py: `settings_from_state_dict`).

The source is a state dict, `.pt`/`.pth`/`.bin` (read by torch.load with weights_only; a
training checkpoint's "ema" entry is taken, as the authors' samplers do) or `.safetensors`
(read with numpy). DiT and SiT come with the authors' names (`blocks.N.attn.qkv`,
`t_embedder.mlp.0`) or, for DiT, diffusers' `DiTTransformer2DModel` names
(`transformer_blocks.N.attn1.to_q`; their per-block copies of the timestep and class
embeddings must all equal block 0's, as diffusers' conversion made them). The VAE comes with
diffusers' `AutoencoderKL` names, current or legacy (`query`/`key`/`value`/`proj_attn`).
Nothing is downloaded.

The output (`.safetensors` or `.npz`) holds the Flax parameters keyed by their paths joined
with "/" (what multistep_cm/teachers/weights.py reads for `config.teacher_checkpoint`); a JSON
beside it (same name, `.json`) records the architecture's settings, the source's sha256, and
for DiT/SiT the factory and the `config.teacher` keys that distil it (docs/teachers.md,
"Converted teachers"). The shape comes from the arrays; what they cannot say is a flag: the
head count (`--size`, `--heads`; known for the paper's sizes), the VAE's GroupNorm groups and
scaling factor. `--forward=diffusers` reproduces diffusers' DiT forward instead of the
authors' (models/dit.py). A key that is unknown, missing or of the wrong shape is refused in
one line `convert: error: ...` naming the first one, exit 2.
"""
import argparse
import json
import os
import re
import sys
from typing import Any, Mapping, Sequence

from flax import traverse_util
import jax
import jax.numpy as jnp
import numpy as np

from multistep_cm.evaluation import tree_io
from multistep_cm.models import adm as adm_lib
from multistep_cm.models import dit as dit_lib
from multistep_cm.models import partitioning
from multistep_cm.models import vae as vae_lib
from multistep_cm.sampling import inputs
from multistep_cm.teachers import weights as weights_lib

KINDS = ("dit", "sit", "sd-vae", "edm")
FORWARDS = {"original": {"time_freq_shift": 0.0, "mlp_norm_eps": 1e-6},
            "diffusers": {"time_freq_shift": 1.0, "mlp_norm_eps": 1e-5}}
# The config.teacher keys of each network's convention (docs/teachers.md).
TEACHER_KEYS = {
    "dit": {"kind": "module", "frame": "vp", "prediction": "eps", "schedule": "ddpm_linear",
            "time_scale": 999.0},
    "sit": {"kind": "module", "frame": "flow", "prediction": "velocity",
            "flow_time": "noise_at_0"},
    "edm": {"kind": "module", "frame": "ve", "prediction": "x"},
}
# diffusers' q, k, v in the order of the authors' fused qkv rows.
QKV_ORDER = ("to_q", "to_k", "to_v")


class ConversionError(ValueError):
  """The source is not a state dict this converter can map (one line)."""


# --- reading ----------------------------------------------------------------------------------


def read_state_dict(path: str) -> dict[str, np.ndarray]:
  """numpy float32 arrays of a `.safetensors` file or a torch `.pt`/`.pth`/`.bin`."""
  if not os.path.isfile(path):
    raise ConversionError(f"--src={path}: no such file")
  if path.endswith(".safetensors"):
    try:
      flat = weights_lib.read_safetensors(path)
    except (weights_lib.WeightsError, KeyError, ValueError) as e:
      raise ConversionError(f"--src={path}: not a readable safetensors file ({e})") from None
    return {k: np.asarray(v, np.float32) for k, v in flat.items()}
  try:
    import torch  # pylint: disable=g-import-not-at-top
  except ImportError:
    raise ConversionError("reading a .pt/.pth/.bin needs torch (a CPU build is enough), or "
                          "convert a .safetensors file") from None
  try:
    state_dict = torch.load(path, map_location="cpu", weights_only=True)
  except Exception as e:  # pylint: disable=broad-except
    first = (str(e).splitlines() or [""])[0][:160]
    raise ConversionError(f"--src={path}: not a torch state dict ({type(e).__name__}: "
                          f"{first})") from None
  if isinstance(state_dict, Mapping) and isinstance(state_dict.get("ema"), Mapping):
    state_dict = state_dict["ema"]  # a training checkpoint: its EMA weights
  if not isinstance(state_dict, Mapping):
    raise ConversionError(f"--src={path}: holds a {type(state_dict).__name__}, not a state dict")
  out = {}
  for key, value in state_dict.items():
    if not hasattr(value, "detach"):
      raise ConversionError(f"--src={path}: entry {key!r} is a {type(value).__name__}, not a "
                            "tensor")
    out[key] = value.detach().float().cpu().numpy()
  return out


# --- shared mapping ---------------------------------------------------------------------------


def torch_name(flax_path: str) -> str:
  """"blocks_3/attn/qkv/kernel" -> "blocks.3.attn.qkv.weight" (list indices as ".N")."""
  *modules, leaf = flax_path.split("/")
  modules = [re.sub(r"_(\d+)$", r".\1", m) for m in modules]
  return ".".join(modules + [{"kernel": "weight", "scale": "weight",
                              "embedding": "weight"}.get(leaf, leaf)])


def to_flax_layout(flax_path: str, value: np.ndarray) -> np.ndarray:
  """Linear [out, in] -> [in, out]; conv [out, in, kh, kw] -> [kh, kw, in, out]."""
  if flax_path.endswith("/kernel"):
    return value.transpose(2, 3, 1, 0) if value.ndim == 4 else value.T
  return value


def _flax_shapes(module, *inputs) -> dict[str, tuple[int, ...]]:
  abstract = jax.eval_shape(module.init, jax.random.PRNGKey(0), *inputs)
  params = partitioning.unbox(abstract["params"])
  out = {}

  def walk(tree, prefix):
    for key, value in tree.items():
      path = f"{prefix}/{key}" if prefix else key
      if isinstance(value, Mapping):
        walk(value, path)
      else:
        out[path] = tuple(value.shape)

  walk(params, "")
  return out


def _fill(shapes: Mapping[str, tuple[int, ...]], state_dict: Mapping[str, np.ndarray],
          name_of, ignored=()) -> dict[str, np.ndarray]:
  """Each Flax path of `shapes` from `state_dict[name_of(path)]`; every source entry used.
  Raises ConversionError naming the first missing, mis-shaped or unknown entry."""
  flat, problems = tree_io.fill_from_state_dict(shapes, state_dict, name_of, to_flax_layout,
                                                lambda name: name in ignored)
  if problems:
    first = problems[0]
    if first.startswith("unused source entries"):
      leftover = sorted(k for k in state_dict if k not in {name_of(p) for p in shapes}
                        and k not in ignored)
      first = f"unknown key {leftover[0]}" + (f" (and {len(leftover) - 1} more)"
                                                if len(leftover) > 1 else "")
    more = f" ({len(problems) - 1} more problems)" if len(problems) > 1 else ""
    raise ConversionError(first + more)
  return flat


def _need(state_dict, *keys):
  for key in keys:
    if key not in state_dict:
      raise ConversionError(f"missing {key} (has {sorted(state_dict)[:3]} ...)")


# --- DiT / SiT --------------------------------------------------------------------------------

_DIFFUSERS_BLOCK = {
    "norm1.linear.": "adaLN_modulation.1.", "attn1.to_out.0.": "attn.proj.",
    "ff.net.0.proj.": "mlp.fc1.", "ff.net.2.": "mlp.fc2.",
}
_DIFFUSERS_EMBEDDING = {
    "norm1.emb.timestep_embedder.linear_1.": "t_embedder.mlp.0.",
    "norm1.emb.timestep_embedder.linear_2.": "t_embedder.mlp.2.",
    "norm1.emb.class_embedder.embedding_table.": "y_embedder.embedding_table.",
}
_DIFFUSERS_TOP = {
    "pos_embed.proj.": "x_embedder.proj.", "proj_out_1.": "final_layer.adaLN_modulation.1.",
    "proj_out_2.": "final_layer.linear.",
}
_BLOCK = re.compile(r"transformer_blocks\.(\d+)\.(.*)$")


def _rename(rest: str, table: Mapping[str, str]) -> str | None:
  for old, new in table.items():
    if rest.startswith(old):
      return new + rest[len(old):]
  return None


def dit_original_names(state_dict: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
  """A diffusers `DiTTransformer2DModel` state dict in the authors' names (q, k, v fused, the
  shared embeddings taken from block 0 after checking every block holds the same); the
  authors' names are returned as they are."""
  if not any(k.startswith("transformer_blocks.") for k in state_dict):
    return dict(state_dict)
  out, qkv, embeddings = {}, {}, {}
  for name in sorted(state_dict, key=_natural):
    value = state_dict[name]
    top = _rename(name, _DIFFUSERS_TOP)
    if top is not None:
      out[top] = value
      continue
    match = _BLOCK.match(name)
    if not match:
      raise ConversionError(f"unknown key {name}")
    block, rest = int(match.group(1)), match.group(2)
    renamed = _rename(rest, _DIFFUSERS_BLOCK)
    if renamed is not None:
      out[f"blocks.{block}.{renamed}"] = value
      continue
    shared = _rename(rest, _DIFFUSERS_EMBEDDING)
    if shared is not None:
      embeddings.setdefault(shared, {})[block] = value
      continue
    part = re.match(r"attn1\.(to_[qkv])\.(weight|bias)$", rest)
    if not part:
      raise ConversionError(f"unknown key {name}")
    qkv.setdefault((block, part.group(2)), {})[part.group(1)] = value
  for (block, leaf), parts in sorted(qkv.items()):
    absent = [p for p in QKV_ORDER if p not in parts]
    if absent:
      raise ConversionError(f"missing transformer_blocks.{block}.attn1.{absent[0]}.{leaf}")
    out[f"blocks.{block}.attn.qkv.{leaf}"] = np.concatenate([parts[p] for p in QKV_ORDER])
  blocks = sorted({b for (b, _) in qkv})
  for shared, per_block in sorted(embeddings.items()):
    if 0 not in per_block:
      raise ConversionError(f"missing transformer_blocks.0.{_diffusers_embedding(shared)}")
    for block in blocks:
      value = per_block.get(block)
      where = f"transformer_blocks.{block}.{_diffusers_embedding(shared)}"
      if value is None:
        raise ConversionError(f"missing {where}")
      if value.shape != per_block[0].shape or not np.array_equal(value, per_block[0]):
        raise ConversionError(f"{where} differs from block 0's: DiT has one timestep and "
                              "class embedding, which diffusers copies into every block")
    out[shared] = per_block[0]
  return out


def _diffusers_embedding(original: str) -> str:
  return next(k for k, v in _DIFFUSERS_EMBEDDING.items() if original.startswith(v)) + \
      original.split(".")[-1]


def _natural(name: str):
  return [int(p) if p.isdigit() else p for p in name.split(".")]


def _parse_size(size: str) -> tuple[str, int]:
  match = re.fullmatch(r"(?:DiT-|SiT-)?(S|B|L|XL)[/-](\d+)", size.strip(), re.IGNORECASE)
  if not match or int(match.group(2)) not in dit_lib.PATCHES:
    raise ConversionError(f"--size={size!r} must be one of S, B, L, XL with patch "
                          f"{'/'.join(map(str, dit_lib.PATCHES))}, e.g. XL/2")
  return match.group(1).upper(), int(match.group(2))


def dit_settings(sd: Mapping[str, np.ndarray], size: str = "", heads: int = 0,
                 num_classes: int = 0, forward: str = "original",
                 scan: bool = True) -> dict[str, Any]:
  """The DiT's settings from the arrays of an authors'-named state dict (and the flags)."""
  _need(sd, "x_embedder.proj.weight", "y_embedder.embedding_table.weight",
        "t_embedder.mlp.0.weight", "blocks.0.mlp.fc1.weight", "final_layer.linear.weight")
  hidden, in_channels, patch, patch_w = sd["x_embedder.proj.weight"].shape
  if patch != patch_w:
    raise ConversionError(f"x_embedder.proj.weight has a {patch}x{patch_w} patch, not square")
  depth = len({k.split(".")[1] for k in sd if k.startswith("blocks.")})
  out_rows = sd["final_layer.linear.weight"].shape[0]
  if out_rows not in (patch * patch * in_channels, 2 * patch * patch * in_channels):
    raise ConversionError(f"final_layer.linear.weight has {out_rows} rows, not {patch}^2 x "
                          f"{in_channels} or twice that")
  known = {(d, w): h for d, w, h in dit_lib.SIZES.values()}
  if size:
    name, want_patch = _parse_size(size)
    want = dit_lib.SIZES[name]
    if (depth, hidden, patch) != (want[0], want[1], want_patch):
      raise ConversionError(f"--size={size}: the state dict has depth {depth}, hidden size "
                            f"{hidden}, patch {patch}; {name}/{want_patch} has {want[0]}, "
                            f"{want[1]}, {want_patch}")
    heads = heads or want[2]
  heads = heads or known.get((depth, hidden), 0)
  if not heads:
    raise ConversionError(f"a DiT of depth {depth} and hidden size {hidden} is none of the "
                          "paper's sizes: give --heads")
  if hidden % heads:
    raise ConversionError(f"--heads={heads} does not divide the hidden size {hidden}")
  rows = sd["y_embedder.embedding_table.weight"].shape[0]
  num_classes = num_classes or rows - 1
  if rows != num_classes + 1:
    raise ConversionError(f"y_embedder.embedding_table.weight has {rows} rows, not "
                          f"--num_classes={num_classes} + the null class")
  if forward not in FORWARDS:
    raise ConversionError(f"--forward={forward!r} must be one of {sorted(FORWARDS)}")
  return {"patch_size": int(patch), "hidden_size": int(hidden), "depth": depth,
          "num_heads": int(heads),
          "mlp_ratio": float(sd["blocks.0.mlp.fc1.weight"].shape[0] / hidden),
          "num_classes": int(num_classes), "learn_sigma": bool(out_rows != patch ** 2 *
                                                                in_channels),
          "frequency_embedding_size": int(sd["t_embedder.mlp.0.weight"].shape[1]),
          **FORWARDS[forward], "scan": bool(scan), "in_channels": int(in_channels)}


def _dit_name(flax_path: str) -> str:
  name = torch_name(flax_path)
  name = name.replace("x_embedder.", "x_embedder.proj.")
  return name.replace(".adaLN_modulation.", ".adaLN_modulation.1.")


def _stack_blocks(flat: Mapping[str, np.ndarray], depth: int) -> dict[str, np.ndarray]:
  """`blocks_i/...` (i < depth) -> `blocks/...` stacked on a leading axis (nn.scan's layout)."""
  out = {k: v for k, v in flat.items() if not k.startswith("blocks_")}
  leaves = sorted({k.split("/", 1)[1] for k in flat if k.startswith("blocks_")})
  for leaf in leaves:
    out[f"blocks/{leaf}"] = np.stack([flat[f"blocks_{i}/{leaf}"] for i in range(depth)])
  return out


def convert_dit(state_dict: Mapping[str, np.ndarray], size: str = "", heads: int = 0,
                num_classes: int = 0, forward: str = "original",
                scan: bool = True) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
  """A DiT/SiT state dict (either naming) -> (settings, flat Flax parameters)."""
  sd = dit_original_names(state_dict)
  settings = dit_settings(sd, size, heads, num_classes, forward, scan)
  unrolled = dit_lib.from_settings({**settings, "scan": False})
  p, channels = settings["patch_size"], settings["in_channels"]
  shapes = _flax_shapes(unrolled, jnp.zeros((1, p, p, channels)), jnp.zeros((1,)),
                        jnp.zeros((1,), jnp.int32))
  if "pos_embed" in sd:  # the authors' fixed embedding, stored; ours is computed
    pos = sd["pos_embed"].reshape(-1, settings["hidden_size"])
    grid = int(round(np.sqrt(pos.shape[0])))
    if grid * grid != pos.shape[0] or not np.allclose(
        pos, dit_lib.position_embedding(grid, grid, settings["hidden_size"]), atol=1e-5):
      raise ConversionError("pos_embed is not DiT's fixed sine-cosine embedding of a square "
                            "grid")
    settings["input_size"] = grid * p
  flat = _fill(shapes, sd, _dit_name, ignored=("pos_embed",))
  if scan:
    flat = _stack_blocks(flat, settings["depth"])
  return settings, flat


def factory_of(kind: str, settings: Mapping[str, Any]) -> str | None:
  """`multistep_cm.models.dit:<kind>_<size>_<patch>` where the settings are that preset's."""
  for size in dit_lib.SIZES:
    for patch in dit_lib.PATCHES:
      module = dit_lib.preset(size, patch)
      if all(getattr(module, k) == settings[k] for k in dit_lib.SETTINGS):
        return f"multistep_cm.models.dit:{kind}_{size.lower()}_{patch}"
  return None


# --- the SD VAE -------------------------------------------------------------------------------

_LEGACY_ATTENTION = {"query.": "to_q.", "key.": "to_k.", "value.": "to_v.",
                     "proj_attn.": "to_out.0."}


def vae_current_names(state_dict: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
  """Legacy attention names (`attentions.0.query`) as diffusers' current ones (`to_q`), and
  1x1-conv attention projections [C, C, 1, 1] as the linear layers they are."""
  out = {}
  for name, value in state_dict.items():
    match = re.match(r"(.*\.attentions\.\d+\.)(.*)$", name)
    if match:
      renamed = _rename(match.group(2), _LEGACY_ATTENTION)
      if renamed is not None:
        name = match.group(1) + renamed
      if value.ndim == 4 and value.shape[2:] == (1, 1) and "group_norm" not in name:
        value = value[:, :, 0, 0]
    out[name] = value
  return out


def vae_settings(sd: Mapping[str, np.ndarray], norm_num_groups: int = 32,
                 scaling_factor: float = 0.18215) -> dict[str, Any]:
  _need(sd, "encoder.conv_in.weight", "decoder.conv_in.weight", "decoder.conv_out.weight",
        "encoder.down_blocks.0.resnets.0.conv2.weight")
  levels = len({k.split(".")[2] for k in sd if k.startswith("encoder.down_blocks.")})
  widths = []
  for i in range(levels):
    key = f"encoder.down_blocks.{i}.resnets.0.conv2.weight"
    _need(sd, key)
    widths.append(int(sd[key].shape[0]))
  layers = len({k.split(".")[4] for k in sd if k.startswith("encoder.down_blocks.0.resnets.")})
  if any(w % norm_num_groups for w in widths):
    raise ConversionError(f"--norm_num_groups={norm_num_groups} does not divide the widths "
                          f"{widths}")
  return {"block_out_channels": widths, "layers_per_block": layers,
          "latent_channels": int(sd["decoder.conv_in.weight"].shape[1]),
          "norm_num_groups": int(norm_num_groups),
          "in_channels": int(sd["encoder.conv_in.weight"].shape[1]),
          "out_channels": int(sd["decoder.conv_out.weight"].shape[0]),
          "mid_block_attention": any(k.startswith("encoder.mid_block.attentions.") for k in sd),
          "scaling_factor": float(scaling_factor)}


def convert_vae(state_dict: Mapping[str, np.ndarray], norm_num_groups: int = 32,
                scaling_factor: float = 0.18215
                ) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
  """A diffusers `AutoencoderKL` state dict -> (settings, flat Flax parameters)."""
  sd = vae_current_names(state_dict)
  settings = vae_settings(sd, norm_num_groups, scaling_factor)
  module = vae_lib.from_settings(settings)
  side = 2 ** (len(settings["block_out_channels"]) - 1)
  shapes = _flax_shapes(module, jnp.zeros((1, side, side, settings["in_channels"])))
  return settings, _fill(shapes, sd, torch_name)


# --- the command ------------------------------------------------------------------------------


def convert_edm(state_dict: Mapping[str, np.ndarray]) -> tuple[dict[str, Any], dict]:
  """`(settings, flat Flax parameters)` of EDM's ADM UNet (models/adm.py) from its
  `EDMPrecond` state dict; the arrays are checked against the network their settings build."""
  try:
    settings = adm_lib.settings_from_state_dict(state_dict)
    params = adm_lib.params_from_state_dict(state_dict)
  except ValueError as e:
    raise ConversionError(str(e)) from None
  teacher = adm_lib.EDMTeacher(adm_lib.ADMUNet(**settings, dropout=0.0))
  size = settings["img_resolution"]
  shapes = jax.eval_shape(lambda: teacher.init(
      jax.random.PRNGKey(0), jnp.zeros((1, size, size, settings["in_channels"])),
      jnp.ones((1,)), jnp.zeros((1,), jnp.int32)))
  wrong = weights_lib.mismatches(params, partitioning.unbox(shapes["params"]))
  if wrong:
    raise ConversionError(f"not EDM's ADM UNet of the settings its arrays imply: {wrong[0]}")
  flat = traverse_util.flatten_dict(params, sep="/")
  return {k: list(v) if isinstance(v, tuple) else v for k, v in settings.items()}, flat


def settings_path(out: str) -> str:
  return os.path.splitext(out)[0] + ".json"


def write(out: str, flat: Mapping[str, np.ndarray], record: Mapping[str, Any]):
  """The parameters at `out` (.safetensors or .npz) and `record` as JSON beside them."""
  flat = {k: np.ascontiguousarray(v, np.float32) for k, v in flat.items()}
  directory = os.path.dirname(os.path.abspath(out))
  os.makedirs(directory, exist_ok=True)
  tmp = f"{out}.tmp{os.getpid()}"
  if out.endswith(".safetensors"):
    weights_lib.write_safetensors(tmp, flat)
  else:
    with open(tmp, "wb") as f:
      np.savez(f, **flat)
  os.replace(tmp, out)
  with open(settings_path(out), "w") as f:
    json.dump(record, f, indent=1, sort_keys=True)
    f.write("\n")


def convert_file(kind: str, src: str, out: str, size: str = "", heads: int = 0,
                 num_classes: int = 0, forward: str = "original", scan: bool = True,
                 norm_num_groups: int = 32, scaling_factor: float = 0.18215) -> dict[str, Any]:
  """Reads `src`, writes `out` and its JSON; returns the JSON's record."""
  if kind not in KINDS:
    raise ConversionError(f"--from={kind!r} must be one of {', '.join(KINDS)}")
  if not (out.endswith(".safetensors") or out.endswith(".npz")):
    raise ConversionError(f"--out={out}: must end in .safetensors or .npz")
  state_dict = read_state_dict(src)
  record = {"network": kind, "source": os.path.basename(src),
            "source_sha256": tree_io.file_sha256(src)}
  if kind == "sd-vae":
    settings, flat = convert_vae(state_dict, norm_num_groups, scaling_factor)
  elif kind == "edm":
    settings, flat = convert_edm(state_dict)
    published = settings == {k: list(v) if isinstance(v, tuple) else v
                             for k, v in adm_lib.IMAGENET64_COND.items()}
    record["factory"] = "multistep_cm.models.adm:edm_imagenet64_cond" if published else None
    record["teacher"] = TEACHER_KEYS[kind]
  else:
    if kind == "sit" and any(k.startswith("transformer_blocks.") for k in state_dict):
      raise ConversionError("SiT is published with the authors' names only; got diffusers' "
                            "DiT names (use --from=dit)")
    settings, flat = convert_dit(state_dict, size, heads, num_classes, forward, scan)
    record["factory"] = factory_of(kind, settings)
    record["teacher"] = TEACHER_KEYS[kind]
  record["settings"] = settings
  write(out, flat, record)
  return record


def fail(message: str, code: int = 2):
  print(f"convert: error: {message}", file=sys.stderr)
  sys.exit(code)


def main(argv: Sequence[str] | None = None):
  parser = argparse.ArgumentParser(prog="python -m multistep_cm.convert",
                                   description=__doc__.split("\n", 1)[0])
  parser.error = fail  # one line, exit 2, like every other bad input
  parser.add_argument("--from", dest="kind", required=True, choices=KINDS)
  parser.add_argument("--src", required=True, help=".pt/.pth/.bin or .safetensors state dict")
  parser.add_argument("--out", required=True, help="output .safetensors or .npz")
  parser.add_argument("--size", default="", help="DiT/SiT: the paper's size, e.g. XL/2 "
                      "(checked against the arrays)")
  parser.add_argument("--heads", type=int, default=0, help="DiT/SiT: attention heads, for a "
                      "size that is not the paper's")
  parser.add_argument("--num_classes", type=int, default=0,
                      help="DiT/SiT: classes (default: the embedding's rows less the null one)")
  parser.add_argument("--forward", default="original", choices=sorted(FORWARDS),
                      help="DiT: the authors' forward or diffusers' (models/dit.py)")
  parser.add_argument("--scan", type=inputs.parse_bool, default=True,
                      help="DiT/SiT: blocks stacked for nn.scan (true) or one per block")
  parser.add_argument("--norm_num_groups", type=int, default=32, help="VAE: GroupNorm groups")
  parser.add_argument("--scaling_factor", type=float, default=0.18215,
                      help="VAE: the latent scaling factor (SD 1.x's VAEs: 0.18215)")
  args = parser.parse_args(argv)
  try:
    record = convert_file(args.kind, args.src, args.out, args.size, args.heads,
                          args.num_classes, args.forward, args.scan, args.norm_num_groups,
                          args.scaling_factor)
  except ConversionError as e:
    fail(str(e))
  except OSError as e:
    fail(f"--out={args.out}: cannot write ({e.strerror or e})", 6)
  print(f"wrote {args.out} and {settings_path(args.out)}: {record['network']} "
        f"{json.dumps(record['settings'], sort_keys=True)}")


if __name__ == "__main__":
  main()
