"""Converts pytorch-fid's FID Inception weights to this package's `.npz` format.

  python -m multistep_cm.evaluation.convert_inception \\
      --src=pt_inception-2015-12-05-6726825d.pth --out=inception_fid.npz

The source is pytorch-fid's release of the TensorFlow FID graph's weights (see
`inception.TORCH_WEIGHTS_URL`; fetch it yourself, nothing here downloads).
Only this command needs torch (a CPU build is enough), to read the `.pth`;
the mapping itself is numpy and is tested without torch.

Mapping: module paths are the same with "." for "/"; a conv kernel goes from
PyTorch's [out, in, kh, kw] to Flax's [kh, kw, in, out], the fc weight is
transposed, and batch-norm weight/bias/running_mean/running_var become
params scale/bias and batch_stats mean/var. Every Flax variable must be filled
exactly once and every source entry used, except `num_batches_tracked`
counters and an `AuxLogits` head (training-only, absent from the FID graph).
"""
import argparse
import re
from typing import Any, Mapping, Sequence

import numpy as np

from multistep_cm.evaluation import inception
from multistep_cm.evaluation import tree_io

# (collection, Flax leaf name) -> PyTorch parameter name.
_LEAF_NAMES = {
    ("params", "kernel"): "weight",
    ("params", "scale"): "weight",
    ("params", "bias"): "bias",
    ("batch_stats", "mean"): "running_mean",
    ("batch_stats", "var"): "running_var",
}
# Source entries with no counterpart in the inference network.
_IGNORED = re.compile(r"(.*\.num_batches_tracked|AuxLogits\..*)$")


def torch_name(flax_path: str) -> str:
  """"params/Mixed_5b/branch1x1/conv/kernel" -> "Mixed_5b.branch1x1.conv.weight"."""
  collection, *modules, leaf = flax_path.split("/")
  if (collection, leaf) not in _LEAF_NAMES:
    raise ValueError(f"no PyTorch name for Flax variable {flax_path!r}")
  return ".".join(modules + [_LEAF_NAMES[collection, leaf]])


def to_flax_layout(flax_path: str, value: np.ndarray) -> np.ndarray:
  """A PyTorch array in the layout of the Flax variable at `flax_path`."""
  if flax_path.endswith("/kernel"):
    if value.ndim == 4:
      return value.transpose(2, 3, 1, 0)  # [out, in, kh, kw] -> [kh, kw, in, out]
    if value.ndim == 2:
      return value.T  # Linear [out, in] -> Dense [in, out]
  return value


def convert_state_dict(state_dict: Mapping[str, np.ndarray]) -> dict[str, Any]:
  """PyTorch FID Inception state dict (numpy values) -> Flax variables of `InceptionV3`.

  Raises:
    ValueError: a variable is missing, has the wrong shape, or a source entry is left over.
  """
  flat, problems = tree_io.fill_from_state_dict(
      inception.variable_shapes(), state_dict, torch_name, to_flax_layout,
      lambda name: bool(_IGNORED.match(name)))
  if problems:
    raise ValueError("state dict does not match the FID InceptionV3: " + "; ".join(problems[:10]))
  return tree_io.unflatten(flat)


def convert_file(src: str, out: str) -> dict[str, Any]:
  """Reads the `.pth` at `src` with torch and writes the `.npz` at `out`; returns its metadata."""
  try:
    import torch  # pylint: disable=g-import-not-at-top
  except ImportError as e:
    raise ImportError("converting the .pth needs torch (only for this one-off step): "
                      "pip install torch  (the CPU build is enough)") from e
  state_dict = torch.load(src, map_location="cpu", weights_only=True)
  variables = convert_state_dict({k: v.detach().cpu().numpy() for k, v in state_dict.items()})
  metadata = {
      "network": inception.NETWORK_NAME,
      "source": src.rsplit("/", 1)[-1],
      "source_sha256": tree_io.file_sha256(src),
      "weights_sha256": inception.variables_digest(variables),
  }
  tree_io.save(out, variables, metadata)
  return metadata


def main(argv: Sequence[str] | None = None):
  parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
  parser.add_argument("--src", required=True, help=f"path to {inception.TORCH_WEIGHTS_NAME}")
  parser.add_argument("--out", required=True, help="output .npz, e.g. inception_fid.npz")
  args = parser.parse_args(argv)
  metadata = convert_file(args.src, args.out)
  print(f"wrote {args.out}: {metadata}")


if __name__ == "__main__":
  main()
