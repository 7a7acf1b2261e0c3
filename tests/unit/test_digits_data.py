"""The embedded digits: scaling, splits and upsampling."""
import numpy as np
import pytest

from multistep_cm.data import digits


def test_scaling_and_split_sizes():
  x_tr, y_tr = digits.load_digits("train")
  x_te, y_te = digits.load_digits("test")
  assert x_tr.shape[1:] == (8, 8, 1) and x_tr.dtype == np.float32
  assert len(x_tr) + len(x_te) == digits.NUM_EXAMPLES
  # The raw pixels are the integers 0..16, so scaled values lie on that grid in [-1, 1].
  raw = (x_tr + 1) / 2 * 16
  np.testing.assert_allclose(raw, np.round(raw), atol=1e-5)
  assert x_tr.min() == -1.0 and x_tr.max() == 1.0
  assert set(np.unique(y_tr)) == set(range(10)) and set(np.unique(y_te)) == set(range(10))


def test_splits_are_disjoint_and_cover_all():
  train, test = digits.split_indices("train"), digits.split_indices("test")
  assert not set(train) & set(test)
  np.testing.assert_array_equal(np.sort(np.concatenate([train, test])), digits.split_indices("all"))
  x_all, y_all = digits.load_digits("all")
  x_te, y_te = digits.load_digits("test")
  np.testing.assert_array_equal(x_te, x_all[test])
  np.testing.assert_array_equal(y_te, y_all[test])


def test_upsampling_preserves_constant_images_and_mean():
  w = digits._bilinear_matrix(8, 16)
  np.testing.assert_allclose(w.sum(axis=1), 1.0)  # a constant image stays constant
  x8, _ = digits.load_digits("all", 8)
  x16, _ = digits.load_digits("all", 16)
  assert x16.shape[1:] == (16, 16, 1)
  # Bilinear 2x upsampling with half-pixel centres and edge clamping keeps each image's mean.
  np.testing.assert_allclose(x16.mean(axis=(1, 2, 3)), x8.mean(axis=(1, 2, 3)), atol=1e-5)
  assert x16.min() >= -1.0 and x16.max() <= 1.0


def test_bad_arguments_name_what_is_allowed():
  with pytest.raises(ValueError, match="split"):
    digits.load_digits("val")
  with pytest.raises(ValueError, match="image_size"):
    digits.load_digits("train", 12)
