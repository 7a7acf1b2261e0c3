"""The reference-statistics command, on an image .npz and on mocked TFDS data (random weights)."""
import jax
import numpy as np
import pytest

from multistep_cm.evaluation import fid
from multistep_cm.evaluation import inception
from multistep_cm.evaluation import reference_stats
from multistep_cm.evaluation import tree_io


@pytest.fixture(scope="module")
def weights(tmp_path_factory):
  variables = inception.random_variables(seed=1)
  path = str(tmp_path_factory.mktemp("inception") / "random_inception.npz")
  tree_io.save(path, variables)
  return path, variables


def test_images_npz_statistics_equal_a_direct_computation(tmp_path, weights):
  path, variables = weights
  images = np.random.default_rng(0).integers(0, 256, (5, 16, 16, 3)).astype(np.uint8)
  np.savez(tmp_path / "images.npz", images=images)
  out = str(tmp_path / "ref.npz")
  reference_stats.main([f"--images_npz={tmp_path / 'images.npz'}", f"--weights={path}",
                        f"--output={out}", "--batch_size=8"])

  stats = fid.FeatureStats.load(out)
  meta = stats.metadata
  assert stats.count == meta["num_samples"] == 5 and meta["feature_dim"] == 2048
  assert meta["network"] == inception.NETWORK_NAME and meta["resize"] == "tf1"
  assert meta["weights_sha256"] == inception.variables_digest(variables)
  assert meta["data"] == "npz:images.npz" and meta["image_size"] == 16
  assert "--images_npz" in meta["command"]
  # The same images through the network on one device, moments in float64 on the host.
  features = jax.jit(inception.features_and_logits)(variables, images)["features"]
  expected = fid.FeatureStats(2048)
  expected.add_features(np.asarray(features))
  np.testing.assert_allclose(stats.sum, expected.sum, rtol=1e-4, atol=1e-4)
  np.testing.assert_allclose(stats.mean_cov()[1], expected.mean_cov()[1], atol=1e-4)


def test_tfds_split_with_mock_data(tmp_path, weights):
  tfds = pytest.importorskip("tensorflow_datasets")
  path, _ = weights
  out = str(tmp_path / "ref.npz")
  with tfds.testing.mock_data(num_examples=3):
    reference_stats.main(["--dataset=imagenet2012", "--split=validation", "--image_size=16",
                          f"--weights={path}", f"--output={out}", "--batch_size=8"])
  stats = fid.FeatureStats.load(out)
  assert stats.count == 3
  assert stats.metadata["data"] == "tfds:imagenet2012/validation"
  assert stats.metadata["image_size"] == 16 and "center crop" in stats.metadata["preprocessing"]


def test_unprepared_dataset_names_the_preparation_command(tmp_path):
  pytest.importorskip("tensorflow_datasets")
  with pytest.raises(FileNotFoundError) as info:
    reference_stats.tfds_batches("imagenet2012", "validation", 64, 8, data_dir=str(tmp_path))
  message = str(info.value)
  assert f"tfds build imagenet2012 --data_dir={tmp_path}" in message
  assert "ILSVRC2012_img_val.tar" in message and "downloads/manual" in message


def test_center_crop_resize():
  tf = pytest.importorskip("tensorflow")
  # A 6x10 image whose central 6x6 square is 200 and the side bands 0.
  image = np.zeros((6, 10, 3), np.uint8)
  image[:, 2:8] = 200
  out = reference_stats.center_crop_resize(tf.constant(image), 3).numpy()
  assert out.shape == (3, 3, 3) and out.dtype == np.uint8
  np.testing.assert_array_equal(out, 200)


def test_missing_weights_fail_before_reading_data(tmp_path):
  with pytest.raises(FileNotFoundError, match="convert_inception"):
    reference_stats.main([f"--images_npz={tmp_path / 'absent.npz'}",
                          f"--weights={tmp_path / 'absent_weights.npz'}",
                          f"--output={tmp_path / 'ref.npz'}"])
