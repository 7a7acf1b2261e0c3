"""The FID InceptionV3: shapes at 299x299, input preprocessing, loading weights."""
import socket

import jax
import numpy as np
import pytest

from multistep_cm.evaluation import inception
from multistep_cm.evaluation import tree_io


@pytest.fixture(scope="module")
def random_variables():
  return inception.random_variables(seed=0)


def test_network_runs_at_299_and_gives_pool3_and_logits(random_variables):
  x = np.random.default_rng(0).uniform(-1, 1, (2, 299, 299, 3)).astype(np.float32)
  out = jax.jit(inception.InceptionV3().apply)(random_variables, x)
  assert out["pool3"].shape == (2, inception.POOL3_DIM) == (2, 2048)
  assert out["logits"].shape == (2, inception.NUM_LOGITS) == (2, 1008)
  assert np.all(np.isfinite(out["pool3"])) and np.all(np.isfinite(out["logits"]))
  # pool3 is an average of ReLUs.
  assert np.all(np.asarray(out["pool3"]) >= 0)
  # The logits are the fc layer applied to pool3.
  fc = random_variables["params"]["fc"]
  np.testing.assert_allclose(out["logits"], np.asarray(out["pool3"]) @ fc["kernel"] + fc["bias"],
                             rtol=1e-4, atol=1e-4)


def test_variables_mirror_the_pytorch_modules():
  shapes = inception.variable_shapes()
  assert shapes["params/Conv2d_1a_3x3/conv/kernel"] == (3, 3, 3, 32)
  assert shapes["params/Mixed_6b/branch7x7_2/conv/kernel"] == (1, 7, 128, 128)
  assert shapes["params/Mixed_7c/branch_pool/conv/kernel"] == (1, 1, 2048, 192)
  assert shapes["batch_stats/Mixed_5b/branch_pool/bn/var"] == (32,)
  assert shapes["params/fc/kernel"] == (2048, 1008)
  # No conv has a bias: batch norm supplies it.
  assert not [k for k in shapes if k.endswith("conv/bias")]


@pytest.mark.parametrize("mode,half_pixel", [("tf1", False), ("pytorch_fid", True)])
def test_resize_matches_tensorflow_bilinear(mode, half_pixel):
  tf = pytest.importorskip("tensorflow")
  images = np.random.default_rng(1).integers(0, 256, (2, 32, 24, 3)).astype(np.uint8)
  # TensorFlow's legacy op: half_pixel_centers=False is the TF1 resize inside the FID graph;
  # True is the half-pixel convention that PyTorch's align_corners=False also uses.
  expected = tf.raw_ops.ResizeBilinear(images=images.astype(np.float32), size=[299, 299],
                                       align_corners=False, half_pixel_centers=half_pixel)
  x = np.asarray(inception.preprocess(images, resize=mode))
  pixels = x * 128 + 128 if mode == "tf1" else (x + 1) * 127.5
  # TF computes source coordinates in float32: about 1e-5 of a pixel step, times 255.
  np.testing.assert_allclose(pixels, expected.numpy(), atol=5e-3)


def test_preprocess_scaling_and_float_input():
  x = np.asarray(inception.preprocess(np.full((1, 299, 299, 3), 0, np.uint8)))
  np.testing.assert_allclose(x, -1.0)  # TF graph: (x - 128) / 128
  x = np.asarray(inception.preprocess(np.full((1, 299, 299, 3), 255, np.uint8), "pytorch_fid"))
  np.testing.assert_allclose(x, 1.0)  # pytorch-fid: 2 * x / 255 - 1
  # Floats in [-1, 1] are read as 8-bit pixels: the same result as the uint8 image.
  rng = np.random.default_rng(2)
  u8 = rng.integers(0, 256, (2, 16, 16, 3)).astype(np.uint8)
  as_float = u8.astype(np.float32) / 127.5 - 1 + rng.uniform(-1e-3, 1e-3, u8.shape)
  np.testing.assert_allclose(inception.preprocess(as_float), inception.preprocess(u8), atol=1e-6)
  # Grey images are repeated to RGB; a constant image stays constant.
  grey = np.full((1, 8, 8, 1), 0.5, np.float32)
  out = np.asarray(inception.preprocess(grey, quantize=False))
  assert out.shape == (1, 299, 299, 3)
  np.testing.assert_allclose(out, (1.5 * 127.5 - 128) / 128, rtol=1e-6)


def test_missing_weights_say_where_they_come_from_and_never_download(tmp_path, monkeypatch):
  def no_network(*args, **kwargs):
    raise AssertionError("tried to open a network connection")
  monkeypatch.setattr(socket.socket, "connect", no_network)
  with pytest.raises(FileNotFoundError) as info:
    inception.load_inception_params(str(tmp_path / "inception_fid.npz"))
  message = str(info.value)
  assert inception.TORCH_WEIGHTS_NAME in message and "pytorch-fid" in message
  assert "python -m multistep_cm.evaluation.convert_inception" in message


def test_weights_file_round_trip_and_validation(tmp_path, random_variables):
  path = str(tmp_path / "weights.npz")
  tree_io.save(path, random_variables, {"network": inception.NETWORK_NAME})
  loaded = inception.load_inception_params(path)
  flat, expected = tree_io.flatten(loaded), tree_io.flatten(random_variables)
  assert flat.keys() == expected.keys()
  for key, value in expected.items():
    np.testing.assert_array_equal(flat[key], value)
  assert inception.variables_digest(loaded) == inception.variables_digest(random_variables)

  expected["params/fc/bias"] = np.zeros(1000, np.float32)
  tree_io.save(path, tree_io.unflatten(expected))
  with pytest.raises(ValueError, match="fc/bias"):
    inception.load_inception_params(path)
