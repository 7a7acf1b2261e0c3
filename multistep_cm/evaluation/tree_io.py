"""Parameter trees on disk as flat `.npz` files with a JSON metadata entry.

An `.npz` of arrays keyed by "/"-joined tree paths loads without pickle, with
numpy alone, and a reader can list what is inside with `np.load(path).files`.
"""
import hashlib
import json
import os
from typing import Any, Callable, Mapping

import numpy as np

from multistep_cm.teachers import weights

METADATA_KEY = "__metadata__"


def flatten(tree: Mapping[str, Any], prefix: str = "") -> dict[str, np.ndarray]:
  """Nested dicts of arrays -> {"a/b/c": array}."""
  flat = {}
  for key, value in tree.items():
    path = f"{prefix}/{key}" if prefix else str(key)
    if isinstance(value, Mapping):
      flat.update(flatten(value, path))
    else:
      flat[path] = np.asarray(value)
  return flat


def unflatten(flat: Mapping[str, np.ndarray]) -> dict[str, Any]:
  """{"a/b/c": array} -> nested dicts of arrays."""
  tree: dict[str, Any] = {}
  for path, value in flat.items():
    *parents, leaf = path.split("/")
    node = tree
    for name in parents:
      node = node.setdefault(name, {})
    node[leaf] = value
  return tree


def save(path: str, tree: Mapping[str, Any], metadata: Mapping[str, Any] | None = None):
  """Writes `tree` (and JSON-able `metadata`) to `path` atomically."""
  flat = flatten(tree)
  if METADATA_KEY in flat:
    raise ValueError(f"{METADATA_KEY!r} is reserved for metadata")
  flat[METADATA_KEY] = np.asarray(json.dumps(dict(metadata or {}), sort_keys=True))
  directory = os.path.dirname(os.path.abspath(path))
  os.makedirs(directory, exist_ok=True)
  # Write then rename, so a concurrent reader never sees half a file.
  tmp = f"{path}.tmp{os.getpid()}"
  with open(tmp, "wb") as f:
    np.savez(f, **flat)
  os.replace(tmp, path)


def load(path: str) -> tuple[dict[str, Any], dict[str, Any]]:
  """Returns `(tree, metadata)` written by `save`."""
  with np.load(path, allow_pickle=False) as data:
    flat = {k: data[k] for k in data.files}
  metadata = json.loads(str(flat.pop(METADATA_KEY))) if METADATA_KEY in flat else {}
  return unflatten(flat), metadata


def digest(tree: Mapping[str, Any]) -> str:
  """sha256 of a tree's paths, shapes and float32 values: names a set of weights in reports.

  Hashes content, not a file, so it is the same for every save of the same
  weights (zip entries carry timestamps) and for weights held in memory.
  """
  sha = hashlib.sha256()
  for path, value in sorted(flatten(tree).items()):
    value = np.ascontiguousarray(np.asarray(value, np.float32))
    sha.update(f"{path}:{value.shape};".encode())
    sha.update(value.tobytes())
  return sha.hexdigest()


file_sha256 = weights.file_sha256  # the one definition, where weights are read


def fill_from_state_dict(shapes: Mapping[str, tuple[int, ...]],
                         state_dict: Mapping[str, np.ndarray],
                         source_name: Callable[[str], str],
                         to_layout: Callable[[str, np.ndarray], np.ndarray],
                         ignored: Callable[[str], bool]) -> tuple[dict[str, np.ndarray], list[str]]:
  """Fills each Flax path of `shapes` from `state_dict[source_name(path)]` in float32,
  through `to_layout`. Returns (flat variables, problems): the missing entries, the wrong
  shapes, and the entries left over that `ignored` does not excuse."""
  flat, used, problems = {}, set(), []
  for path, shape in shapes.items():
    name = source_name(path)
    if name not in state_dict:
      problems.append(f"missing {name} (for {path})")
      continue
    value = to_layout(path, np.asarray(state_dict[name], np.float32))
    if value.shape != tuple(shape):
      problems.append(f"{name}: shape {value.shape} in Flax layout, expected {tuple(shape)}")
      continue
    flat[path] = value
    used.add(name)
  leftover = sorted(k for k in state_dict if k not in used and not ignored(k))
  if leftover:
    problems.append(f"unused source entries {leftover[:10]}")
  return flat, problems
