"""A module's weights from a file: `.npz`, `.safetensors` or an orbax checkpoint directory.

`read(path)` gives the nested dict of numpy arrays the file holds. In `.npz` and
`.safetensors` files each array is one flat key, the parameter's path with its parts joined
by `/` (or `.`): `Dense_0/kernel`, the way `flax.traverse_util.flatten_dict(params,
sep="/")` writes it. An orbax directory is a pytree checkpoint of the parameters
(`orbax.checkpoint.PyTreeCheckpointer().save(dir, params)`). The safetensors reader is the
format itself (an 8-byte little-endian header length, a JSON header of dtypes, shapes and
byte offsets, the raw bytes), so no extra package is needed.

`mismatches(tree, abstract)` names what does not fit a module's parameters, first the
first mismatched parameter; `WeightsError` is what a file that cannot be used raises (one
line naming the file).
"""
import hashlib
import json
import os
import struct

from flax import traverse_util
import ml_dtypes
import numpy as np

SUFFIXES = (".npz", ".safetensors")
_SAFETENSORS_DTYPES = {
    "F64": np.float64, "F32": np.float32, "F16": np.float16, "BF16": ml_dtypes.bfloat16,
    "I64": np.int64, "I32": np.int32, "I16": np.int16, "I8": np.int8, "U8": np.uint8,
    "BOOL": np.bool_,
}


class WeightsError(ValueError):
  """A weights file that is missing, unreadable or does not fit the module (one line)."""


def _nest(flat: dict[str, np.ndarray], path: str) -> dict:
  """`{"a/b": x}` (or `{"a.b": x}`) as `{"a": {"b": x}}`."""
  nested = {}
  for key, value in flat.items():
    parts = key.split("/") if "/" in key else key.split(".")
    if any(not p for p in parts):
      raise WeightsError(f"{path}: key {key!r} is not a parameter path (parts joined by '/')")
    node = nested
    for part in parts[:-1]:
      node = node.setdefault(part, {})
      if not isinstance(node, dict):
        raise WeightsError(f"{path}: key {key!r} runs through an array")
    if parts[-1] in node:
      raise WeightsError(f"{path}: key {key!r} is given twice")
    node[parts[-1]] = value
  return nested


def read_safetensors(path: str) -> dict[str, np.ndarray]:
  """`{key: array}` of a `.safetensors` file (the `__metadata__` entry is skipped)."""
  with open(path, "rb") as f:
    head = f.read(8)
    if len(head) != 8:
      raise WeightsError(f"{path}: not a safetensors file (shorter than its header)")
    (length,) = struct.unpack("<Q", head)
    size = os.path.getsize(path)
    if length > size - 8:
      raise WeightsError(f"{path}: not a safetensors file (its header length {length} is past "
                         f"the end)")
    try:
      header = json.loads(f.read(length))
    except (UnicodeDecodeError, json.JSONDecodeError):
      raise WeightsError(f"{path}: not a safetensors file (its header is not JSON)") from None
    data = f.read()
  out = {}
  for key, entry in header.items():
    if key == "__metadata__":
      continue
    dtype = _SAFETENSORS_DTYPES.get(entry.get("dtype"))
    if dtype is None:
      raise WeightsError(f"{path}: {key!r} has dtype {entry.get('dtype')!r}, not one of "
                         f"{sorted(_SAFETENSORS_DTYPES)}")
    start, end = entry["data_offsets"]
    shape = tuple(int(d) for d in entry["shape"])
    if end - start != int(np.prod(shape, dtype=np.int64)) * np.dtype(dtype).itemsize or (
        end > len(data)):
      raise WeightsError(f"{path}: {key!r} is truncated (bytes {start}-{end} of "
                         f"{len(data)})")
    out[key] = np.frombuffer(data[start:end], dtype=dtype).reshape(shape).copy()
  return out


def write_safetensors(path: str, flat: dict[str, np.ndarray]):
  """Writes `{key: array}` as a `.safetensors` file (what a converter or a test writes)."""
  names = {np.dtype(v): k for k, v in _SAFETENSORS_DTYPES.items()}
  header, chunks, offset = {}, [], 0
  for key in sorted(flat):
    array = np.ascontiguousarray(flat[key])
    raw = array.tobytes()
    header[key] = {"dtype": names[array.dtype], "shape": list(array.shape),
                   "data_offsets": [offset, offset + len(raw)]}
    chunks.append(raw)
    offset += len(raw)
  blob = json.dumps(header, separators=(",", ":")).encode()
  blob += b" " * (-len(blob) % 8)  # the format's 8-byte alignment of the data
  with open(path, "wb") as f:
    f.write(struct.pack("<Q", len(blob)) + blob + b"".join(chunks))


def read(path: str) -> dict:
  """The nested dict of numpy arrays that `path` (.npz, .safetensors, an orbax dir) holds.

  Raises:
    WeightsError: the path is missing, of another kind, or unreadable (one line).
  """
  if not path:
    raise WeightsError("no weights file given")
  if os.path.isdir(path):
    return _read_orbax(path)
  if not os.path.isfile(path):
    raise WeightsError(f"{path!r} does not exist")
  if path.endswith(".npz"):
    try:
      with np.load(path, allow_pickle=False) as f:
        flat = {k: np.asarray(f[k]) for k in f.files}
    except (OSError, ValueError, EOFError) as e:
      raise WeightsError(f"{path}: not a readable .npz file ({e})") from None
    return _nest(flat, path)
  if path.endswith(".safetensors"):
    return _nest(read_safetensors(path), path)
  raise WeightsError(f"{path!r} must be a .npz or .safetensors file or an orbax checkpoint "
                     f"directory")


def _read_orbax(path: str) -> dict:
  import orbax.checkpoint as ocp  # pylint: disable=g-import-not-at-top
  try:
    tree = ocp.PyTreeCheckpointer().restore(os.path.abspath(path))
  except Exception as e:  # pylint: disable=broad-except
    first = (str(e).splitlines() or [""])[0][:200]
    raise WeightsError(f"{path}: not a readable orbax checkpoint of the parameters "
                       f"({type(e).__name__}: {first})") from None
  if isinstance(tree, dict) and set(tree) == {"params"}:
    tree = tree["params"]  # saved as {"params": params}, as flax's variables are
  return tree


def mismatches(tree: dict, abstract) -> list[str]:
  """What keeps `tree` from being `abstract`'s parameters: for each parameter path, missing,
  not a parameter of the module, or of another shape. Empty: it fits."""
  have = traverse_util.flatten_dict(tree, sep="/") if tree else {}
  want = traverse_util.flatten_dict(abstract, sep="/") if abstract else {}
  out = []
  for key in sorted(set(have) | set(want)):
    if key not in have:
      out.append(f"{key} is missing (the module has shape {tuple(want[key].shape)})")
    elif key not in want:
      out.append(f"{key} is not a parameter of the module")
    elif tuple(np.shape(have[key])) != tuple(want[key].shape):
      out.append(f"{key} has shape {tuple(np.shape(have[key]))}, the module "
                 f"{tuple(want[key].shape)}")
  return out


def check_fits(path: str, tree: dict, abstract):
  """Raises WeightsError naming the first mismatched parameter (and how many there are)."""
  found = mismatches(tree, abstract)
  if found:
    more = f" (and {len(found) - 1} more)" if len(found) > 1 else ""
    raise WeightsError(f"{path}: does not fit the module: {found[0]}{more}")


def file_sha256(path: str) -> str:
  """sha256 of a file's bytes: names the source a converter read."""
  sha = hashlib.sha256()
  with open(path, "rb") as f:
    for chunk in iter(lambda: f.read(1 << 20), b""):
      sha.update(chunk)
  return sha.hexdigest()
