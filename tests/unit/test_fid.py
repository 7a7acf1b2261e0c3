"""Fréchet distance, Inception Score and streaming statistics, against direct computations."""
import jax
import numpy as np
import pytest
import scipy.linalg

from multistep_cm.evaluation import fid


def _gaussian_features(rng, n, dim, shift=0.0):
  mixing = rng.normal(size=(dim, dim)) / np.sqrt(dim)
  return rng.normal(size=(n, dim)) @ mixing + shift


def _direct_fd(x, y):
  """The textbook formula with scipy's general matrix square root."""
  mu1, mu2 = x.mean(0), y.mean(0)
  c1, c2 = np.cov(x, rowvar=False), np.cov(y, rowvar=False)
  covmean = scipy.linalg.sqrtm(c1 @ c2).real
  return np.sum((mu1 - mu2) ** 2) + np.trace(c1) + np.trace(c2) - 2 * np.trace(covmean)


def test_frechet_distance_matches_scipy():
  rng = np.random.default_rng(0)
  x = _gaussian_features(rng, 500, 32)
  y = _gaussian_features(rng, 400, 32, shift=0.3)
  fd = fid.frechet_distance(x.mean(0), np.cov(x, rowvar=False), y.mean(0), np.cov(y, rowvar=False))
  np.testing.assert_allclose(fd, _direct_fd(x, y), rtol=1e-9)


def test_frechet_distance_of_diagonal_gaussians_is_closed_form():
  rng = np.random.default_rng(1)
  mu1, mu2 = rng.normal(size=8), rng.normal(size=8)
  a, b = rng.uniform(0.1, 2, size=8), rng.uniform(0.1, 2, size=8)
  expected = np.sum((mu1 - mu2) ** 2) + np.sum((np.sqrt(a) - np.sqrt(b)) ** 2)
  np.testing.assert_allclose(fid.frechet_distance(mu1, np.diag(a), mu2, np.diag(b)), expected,
                             rtol=1e-12)


@pytest.mark.parametrize("n", [300, 10])  # 10 < dim: a singular covariance
def test_identical_feature_sets_give_zero(n):
  x = _gaussian_features(np.random.default_rng(2), n, 24)
  mu, cov = x.mean(0), np.cov(x, rowvar=False)
  assert abs(fid.frechet_distance(mu, cov, mu, cov)) < 1e-10 * np.trace(cov)


def test_a_singular_covariance_of_float32_moments_is_a_covariance():
  """24 samples in 64 dimensions, their sum of outer products taken in float32 as on the
  device (`batch_moments`): its zero eigenvalues come out below zero by float32 round-off,
  which the distance takes as zeros (the same set scores ~0), while a real negative
  eigenvalue is still refused."""
  x = _gaussian_features(np.random.default_rng(5), 24, 64, shift=3.0).astype(np.float32)
  stats = fid.FeatureStats(64)
  shift = x[0]
  rows = x - shift
  stats.add_shifted_moments(24, rows.sum(0), rows.T @ rows, shift)  # float32 products
  mu, cov = stats.mean_cov()
  assert np.linalg.eigvalsh(cov).min() < -1e-8 * np.linalg.eigvalsh(cov).max()
  assert abs(fid.frechet_distance(mu, cov, mu, cov)) < 1e-4 * np.trace(cov)
  with pytest.raises(ValueError, match="not a covariance"):
    fid.frechet_distance(mu, cov - 1e-2 * np.trace(cov) / 64 * np.eye(64), mu, cov)


def test_rejects_a_matrix_that_is_not_a_covariance():
  cov = np.diag([1.0, 1.0, -0.5])
  with pytest.raises(ValueError, match="not a covariance"):
    fid.frechet_distance(np.zeros(3), cov, np.zeros(3), np.eye(3))
  with pytest.raises(ValueError, match="shapes"):
    fid.frechet_distance(np.zeros(3), np.eye(3), np.zeros(4), np.eye(4))


def test_feature_stats_mean_cov_merge_and_file_round_trip(tmp_path):
  rng = np.random.default_rng(3)
  x = _gaussian_features(rng, 257, 16, shift=5.0)
  whole = fid.FeatureStats(16, {"data": "toy"})
  whole.add_features(x)
  mu, cov = whole.mean_cov()
  np.testing.assert_allclose(mu, x.mean(0), rtol=1e-12)
  np.testing.assert_allclose(cov, np.cov(x, rowvar=False), rtol=1e-9, atol=1e-12)

  parts = [fid.FeatureStats(16) for _ in range(3)]
  for part, chunk in zip(parts, np.array_split(x, 3)):
    part.add_features(chunk)
  parts[0].merge(parts[1])
  parts[0].merge(parts[2])
  np.testing.assert_allclose(parts[0].mean_cov()[1], cov, rtol=1e-9, atol=1e-12)

  whole.save(tmp_path / "stats.npz")
  loaded = fid.FeatureStats.load(tmp_path / "stats.npz")
  assert loaded.count == 257
  assert loaded.metadata["data"] == "toy" and loaded.metadata["num_samples"] == 257
  np.testing.assert_array_equal(loaded.mean_cov()[1], cov)
  mu_file, sigma_file, meta = fid.load_mean_cov(tmp_path / "stats.npz")
  np.testing.assert_array_equal(mu_file, mu)
  np.testing.assert_array_equal(sigma_file, cov)
  assert meta["feature_dim"] == 16


def test_inception_score_identities():
  # Uniform predictions: every KL is 0, IS = 1.
  mean, std = fid.inception_score(np.zeros((100, 7)), splits=10)
  np.testing.assert_allclose([mean, std], [1.0, 0.0], atol=1e-12)
  # Confident predictions spread evenly over K classes in each split: IS = K.
  k = 5
  logits = 50.0 * np.eye(k)[np.arange(200) % k]
  np.testing.assert_allclose(fid.inception_score(logits, splits=4)[0], k, rtol=1e-6)
  # Random logits: log IS = H(mean p) - mean H(p), per split.
  logits = np.random.default_rng(4).normal(size=(90, 6)) * 3
  p = np.exp(logits) / np.exp(logits).sum(1, keepdims=True)
  scores = []
  for part in np.split(p, 3):
    marginal = part.mean(0)
    scores.append(np.exp(-np.sum(marginal * np.log(marginal))
                         + np.mean(np.sum(part * np.log(part), 1))))
  np.testing.assert_allclose(fid.inception_score(logits, splits=3), [np.mean(scores),
                                                                      np.std(scores)], rtol=1e-10)


def test_sharded_accumulation_equals_unsharded():
  assert jax.device_count() == 8, "tests/conftest.py simulates 8 CPU devices"
  rng = np.random.default_rng(5)
  images = rng.uniform(-1, 1, size=(203, 4, 4, 2)).astype(np.float32)

  def apply_fn(variables, x):
    flat = x.reshape(x.shape[0], -1)
    return {"features": flat * variables["scale"] + 1.0, "logits": flat[:, :5]}

  batches = [images[i:i + 48] for i in range(0, len(images), 48)]  # ragged last batch
  stats, logits = fid.compute_stats(apply_fn, {"scale": np.float32(2.0)}, batches, batch_size=48,
                                    num_batches=len(batches) + 1, keep_logits=True,
                                    metadata={"data": "random"})
  features = images.reshape(203, -1).astype(np.float64) * 2 + 1
  expected = fid.FeatureStats(features.shape[1])
  expected.add_features(features)
  assert stats.count == 203 and stats.metadata == {"data": "random"}
  np.testing.assert_allclose(stats.sum, expected.sum, rtol=1e-6)
  np.testing.assert_allclose(stats.sum_outer, expected.sum_outer, rtol=1e-6)
  np.testing.assert_allclose(stats.mean_cov()[1], expected.mean_cov()[1], atol=1e-5)
  np.testing.assert_array_equal(logits, images.reshape(203, -1)[:, :5])
  with pytest.raises(ValueError, match="multiple of the local device count"):
    fid.compute_stats(apply_fn, {"scale": 1.0}, batches, batch_size=44)


def test_fid_report_refuses_different_networks():
  rng = np.random.default_rng(6)
  a = fid.FeatureStats(4, {"network": "n", "weights_sha256": "w", "resize": "tf1",
                           "params": "ema"})
  b = fid.FeatureStats(4, dict(a.metadata, params=None, data="tfds:x/validation"))
  a.add_features(rng.normal(size=(50, 4)))
  b.add_features(rng.normal(size=(60, 4)))
  report = fid.fid_report(a, b)
  assert report["num_samples"] == 50 and report["reference_num_samples"] == 60
  assert report["samples"]["params"] == "ema" and report["reference"]["data"] == "tfds:x/validation"
  b.metadata["resize"] = "pytorch_fid"
  with pytest.raises(ValueError, match="resize"):
    fid.fid_report(a, b)


def test_features_far_from_the_origin_keep_their_small_variances():
  """Rows near (100, ..., 100) with spread 1e-2 (variances 1e8 times below the squared mean)
  and one direction of exactly zero variance (they sum to a constant, as LayerNorm'd
  features do): float32 sums of the raw rows would lose the spread to round-off; the
  covariance must match numpy's float64 one and stay positive semi-definite."""
  rng = np.random.default_rng(7)
  x = rng.normal(size=(300, 6))
  x -= x.mean(axis=1, keepdims=True)  # every row sums to zero: the all-ones direction is null
  features = (100.0 + 1e-2 * x).astype(np.float32)

  def apply_fn(variables, rows):
    del variables
    return {"features": rows}

  batches = [features[i:i + 64] for i in range(0, len(features), 64)]
  stats, _ = fid.compute_stats(apply_fn, {}, batches, batch_size=64)
  mu, cov = stats.mean_cov()
  want = np.cov(features.astype(np.float64).T)
  np.testing.assert_allclose(mu, features.astype(np.float64).mean(0), rtol=1e-12)
  np.testing.assert_allclose(cov, want, atol=1e-6 * np.abs(want).max())
  assert np.linalg.eigvalsh(cov).min() > -1e-8 * np.linalg.eigvalsh(cov).max()
  assert fid.frechet_distance(mu, cov, mu, cov) == pytest.approx(0.0, abs=1e-10)
