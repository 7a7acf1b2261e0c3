"""The PyTorch -> Flax mapping of the FID Inception weights, tested without torch."""
import sys

import numpy as np
import pytest

from multistep_cm.evaluation import convert_inception
from multistep_cm.evaluation import inception
from multistep_cm.evaluation import tree_io

# How pytorch-fid names each Flax leaf, written out independently of the converter.
_TORCH_LEAF = {"kernel": "weight", "scale": "weight", "bias": "bias", "mean": "running_mean",
               "var": "running_var"}


def _fake_state_dict(seed=0):
  """A PyTorch-layout state dict with random values, and the Flax variables it should become."""
  rng = np.random.default_rng(seed)
  state_dict, flax_flat = {}, {}
  for path, shape in inception.variable_shapes().items():
    _, *modules, leaf = path.split("/")
    value = rng.standard_normal(shape, dtype=np.float32)
    flax_flat[path] = value
    if len(shape) == 4:  # Flax HWIO -> PyTorch OIHW
      torch_value = value.transpose(3, 2, 0, 1)
    elif len(shape) == 2:  # Dense [in, out] -> Linear [out, in]
      torch_value = value.T
    else:
      torch_value = value
    state_dict[".".join(modules + [_TORCH_LEAF[leaf]])] = np.ascontiguousarray(torch_value)
  return state_dict, flax_flat


def test_round_trip_covers_every_variable_exactly_once():
  state_dict, flax_flat = _fake_state_dict()
  # Every Flax variable has its own PyTorch entry: none shares a name.
  assert len(state_dict) == len(flax_flat) == len(inception.variable_shapes())
  # Entries PyTorch checkpoints carry that the inference network has no use for.
  extras = {"Conv2d_1a_3x3.bn.num_batches_tracked": np.array(0),
            "AuxLogits.fc.weight": np.zeros((1008, 768), np.float32)}
  converted = tree_io.flatten(convert_inception.convert_state_dict({**state_dict, **extras}))
  assert converted.keys() == flax_flat.keys()
  for path, value in flax_flat.items():
    np.testing.assert_array_equal(converted[path], value, err_msg=path)
  inception.check_variables(converted)


def test_conv_kernel_transpose_is_pytorch_to_flax_layout():
  # A PyTorch [out=2, in=1, kh=1, kw=3] kernel whose taps are 1, 2, 3 (out 0) and 4, 5, 6 (out 1).
  weight = np.arange(1, 7, dtype=np.float32).reshape(2, 1, 1, 3)
  kernel = convert_inception.to_flax_layout("params/x/conv/kernel", weight)
  assert kernel.shape == (1, 3, 1, 2)  # [kh, kw, in, out]
  np.testing.assert_array_equal(kernel[0, :, 0, 0], [1, 2, 3])
  np.testing.assert_array_equal(kernel[0, :, 0, 1], [4, 5, 6])


@pytest.mark.parametrize("problem", ["missing", "shape", "extra"])
def test_mismatched_state_dicts_are_rejected(problem):
  state_dict, _ = _fake_state_dict(seed=1)
  if problem == "missing":
    del state_dict["Mixed_6e.branch7x7dbl_3.bn.running_var"]
    match = "missing Mixed_6e.branch7x7dbl_3.bn.running_var"
  elif problem == "shape":
    state_dict["fc.weight"] = np.zeros((1000, 2048), np.float32)  # torchvision's 1000 classes
    match = "fc.weight"
  else:
    state_dict["Mixed_7c.branch_pool.conv.bias"] = np.zeros(192, np.float32)
    match = "unused source entries"
  with pytest.raises(ValueError, match=match):
    convert_inception.convert_state_dict(state_dict)


def test_without_torch_the_conversion_says_what_to_install(tmp_path, monkeypatch):
  monkeypatch.setitem(sys.modules, "torch", None)  # makes `import torch` fail
  with pytest.raises(ImportError, match="pip install torch"):
    convert_inception.convert_file(str(tmp_path / "in.pth"), str(tmp_path / "out.npz"))
