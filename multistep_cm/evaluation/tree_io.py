"""Parameter trees on disk as flat `.npz` files with a JSON metadata entry.

An `.npz` of arrays keyed by "/"-joined tree paths loads without pickle, with
numpy alone, and a reader can list what is inside with `np.load(path).files`.
"""
import hashlib
import json
import os
from typing import Any, Mapping

import numpy as np

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
