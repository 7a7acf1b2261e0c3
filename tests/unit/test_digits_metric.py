"""The digits classifier metric: trained here, cached, ranks real digits above corruptions."""
import numpy as np
import pytest
import scipy.linalg
import scipy.ndimage

from multistep_cm.data import digits
from multistep_cm.evaluation import digits_metric


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory):
  return str(tmp_path_factory.mktemp("digits_cache"))


@pytest.fixture(scope="module")
def classifier(cache_dir):
  # No cache yet in a fresh directory: this trains the default classifier (seconds, CPU).
  return digits_metric.load_or_train_classifier(8, cache_dir=cache_dir)


def test_classifier_is_accurate_on_held_out_digits(classifier):
  x_test, y_test = digits.load_digits("test", 8)
  probs = classifier.predict(x_test)
  np.testing.assert_allclose(probs.sum(-1), 1.0, rtol=1e-9)
  accuracy = np.mean(np.argmax(probs, -1) == y_test)
  assert accuracy >= 0.95
  assert classifier.metadata["test_accuracy"] == pytest.approx(accuracy)
  assert classifier.features(x_test[:3]).shape == (3, classifier.settings["feature_dim"])


def test_cache_is_reused_and_keyed_by_settings(classifier, cache_dir, monkeypatch):
  path = digits_metric.classifier_path(8, cache_dir=cache_dir)
  assert path.endswith(f"digits_classifier_8px_{classifier.metadata['settings_hash']}.npz")
  again = digits_metric.load_or_train_classifier(8, cache_dir=cache_dir)  # loads, no training
  assert again.metadata == classifier.metadata and again.name == classifier.name
  x, _ = digits.load_digits("test", 8)
  np.testing.assert_array_equal(again.features(x[:20]), classifier.features(x[:20]))
  # Any change of setting or image size names another file, so nothing stale is reused.
  changed = dict(digits_metric.DEFAULT_SETTINGS, epochs=1)
  assert digits_metric.classifier_path(8, changed, cache_dir) != path
  assert digits_metric.classifier_path(16, cache_dir=cache_dir) != path
  monkeypatch.setenv(digits_metric.CACHE_ENV, cache_dir + "/elsewhere")
  assert digits_metric.classifier_path(8).startswith(cache_dir + "/elsewhere/")


def _blur(images):
  return scipy.ndimage.uniform_filter(images, size=(1, 3, 3, 1), mode="nearest")


def test_real_digits_rank_far_above_noise_and_blur(classifier):
  x_test, y_test = digits.load_digits("test", 8)
  rng = np.random.default_rng(0)
  corrupted = {
      "gaussian": rng.normal(size=x_test.shape).astype(np.float32),
      "uniform": rng.uniform(-1, 1, size=x_test.shape).astype(np.float32),
      "blurred": _blur(x_test),
  }
  real = digits_metric.digits_metrics(x_test, y_test, reference="train", classifier=classifier)
  assert real["accuracy"] >= 0.95
  for name, images in corrupted.items():
    other = digits_metric.digits_metrics(images, y_test, reference="train", classifier=classifier)
    assert real["fd"] * 10 < other["fd"], (name, real["fd"], other["fd"])
    assert real["accuracy"] > other["accuracy"] + 0.05, (name, real["accuracy"], other["accuracy"])


def test_fd_against_itself_is_zero_and_equals_direct_computation(classifier):
  x_train, _ = digits.load_digits("train", 8)
  same = digits_metric.digits_metrics(x_train, reference="train", classifier=classifier)
  assert abs(same["fd"]) < 1e-9
  assert "accuracy" not in same and same["num_samples"] == same["reference_num_samples"]

  x_test, _ = digits.load_digits("test", 8)
  result = digits_metric.digits_metrics(x_test, reference="train", classifier=classifier)
  f1 = classifier.features(x_test).astype(np.float64)
  f2 = classifier.features(x_train).astype(np.float64)
  c1, c2 = np.cov(f1, rowvar=False), np.cov(f2, rowvar=False)
  direct = (np.sum((f1.mean(0) - f2.mean(0)) ** 2) + np.trace(c1) + np.trace(c2)
            - 2 * np.trace(scipy.linalg.sqrtm(c1 @ c2).real))
  np.testing.assert_allclose(result["fd"], direct, rtol=1e-6)


def test_label_entropy_measures_mode_coverage(classifier):
  x_test, y_test = digits.load_digits("test", 8)
  everything = digits_metric.digits_metrics(x_test, y_test, classifier=classifier)
  only_sevens = digits_metric.digits_metrics(x_test[y_test == 7], classifier=classifier)
  assert everything["max_label_entropy"] == pytest.approx(np.log(10))
  assert everything["label_entropy"] > 0.97 * np.log(10)
  assert only_sevens["label_entropy"] < 0.3
  assert 0.9 < everything["confidence"] <= 1.0
  # The report names what was measured.
  assert everything["classifier"] == classifier.name
  assert everything["reference"] == "digits/test at 8x8"
  assert everything["reference_num_samples"] == len(x_test)
  with pytest.raises(ValueError, match="takes images"):
    digits_metric.digits_metrics(np.zeros((4, 16, 16, 1)), classifier=classifier)
