"""The reference-statistics command, on an image .npz and on mocked TFDS data (random weights),
for the FID Inception and for DINOv2."""
import functools

import jax
import numpy as np
import pytest

from multistep_cm.evaluation import dinov2
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
  from multistep_cm.data import sources  # pylint: disable=g-import-not-at-top
  with pytest.raises(sources.DatasetError) as info:
    reference_stats.tfds_batches("imagenet2012", "validation", 64, 8, data_dir=str(tmp_path))
  message = str(info.value)
  assert "python -m multistep_cm.data.prepare --dataset=imagenet2012" in message
  assert "ILSVRC2012_img_val.tar" in message


def test_tfds_images_are_the_training_pipelines(tmp_path):
  """Reference images are exactly the training pipeline's, as uint8."""
  from multistep_cm.data import synthetic  # pylint: disable=g-import-not-at-top
  from multistep_cm.data import tfds_source  # pylint: disable=g-import-not-at-top
  data_dir = str(tmp_path / "tfds")
  synthetic.build(data_dir, num_examples=5)
  batches, num_batches = reference_stats.tfds_batches(synthetic.NAME, "train", 16, 4, data_dir)
  got = np.concatenate(list(batches))
  assert num_batches == 2 and got.shape == (5, 16, 16, 3) and got.dtype == np.uint8
  source = tfds_source.TfdsSource(synthetic.NAME, "train", data_dir, 16)
  np.testing.assert_allclose(got / 127.5 - 1.0, source.get(np.arange(5))["image"], atol=1e-6)


def test_missing_weights_fail_before_reading_data(tmp_path):
  with pytest.raises(FileNotFoundError, match="convert_inception"):
    reference_stats.main([f"--images_npz={tmp_path / 'absent.npz'}",
                          f"--weights={tmp_path / 'absent_weights.npz'}",
                          f"--output={tmp_path / 'ref.npz'}"])


TINY_DINOV2 = dinov2.Dinov2Config(64, 2, 4, 128, pos_grid=4)


@pytest.fixture(scope="module")
def dinov2_weights(tmp_path_factory):
  variables = dinov2.random_variables(TINY_DINOV2, seed=2)
  path = str(tmp_path_factory.mktemp("dinov2") / "random_dinov2.npz")
  dinov2.save_dinov2(path, TINY_DINOV2, variables)
  return path, variables


def test_dinov2_statistics_keep_their_rows_and_records(tmp_path, dinov2_weights):
  path, variables = dinov2_weights
  images = np.random.default_rng(1).integers(0, 256, (6, 16, 16, 1)).astype(np.uint8)
  np.savez(tmp_path / "images.npz", images=images)
  out = str(tmp_path / "ref.npz")
  reference_stats.main([f"--images_npz={tmp_path / 'images.npz'}", "--features=dinov2",
                        f"--weights={path}", "--keep_features", f"--output={out}",
                        "--batch_size=8"])
  stats = fid.FeatureStats.load(out)
  meta = stats.metadata
  assert stats.count == 6 and meta["feature_dim"] == 64 and meta["features"] == "dinov2"
  assert meta["network"] == dinov2.network_name(TINY_DINOV2) and meta["resize"] == "edm2_torch"
  assert meta["weights_sha256"] == tree_io.digest(variables)
  assert "224x224" in meta["feature_preprocessing"]
  # The rows are the network's features of the images, one device, no streaming.
  direct = np.asarray(jax.jit(functools.partial(dinov2.features, TINY_DINOV2))(
      variables, images)["features"])
  np.testing.assert_allclose(stats.features, direct, atol=1e-5)
  expected = fid.FeatureStats(64)
  expected.add_features(direct)
  np.testing.assert_allclose(stats.mean_cov()[0], expected.mean_cov()[0], atol=1e-5)
  np.testing.assert_allclose(stats.mean_cov()[1], expected.mean_cov()[1], atol=1e-6)
  # Statistics of another network are refused, whatever their dimension.
  other = fid.FeatureStats(64, {"network": inception.NETWORK_NAME, "resize": "tf1",
                                "weights_sha256": meta["weights_sha256"]})
  other.add_features(direct)
  with pytest.raises(ValueError, match="differ in 'network'"):
    fid.fid_report(stats, other)


def test_resize_is_a_flag_of_the_inception_only(tmp_path, dinov2_weights):
  with pytest.raises(SystemExit) as info:
    reference_stats.parse_args([f"--images_npz={tmp_path / 'x.npz'}", "--features=dinov2",
                                f"--weights={dinov2_weights[0]}", "--resize=tf1",
                                f"--output={tmp_path / 'ref.npz'}"])
  assert info.value.code == 2


def test_an_inception_file_is_no_dinov2(tmp_path, weights):
  with pytest.raises(ValueError, match="not a converted DINOv2"):
    reference_stats.load_network("dinov2", weights[0])
