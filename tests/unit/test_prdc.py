"""Precision/recall (Kynkäänniemi et al.) and density/coverage (Naeem et al.) on cases whose
answer is known: identical sets, far-apart sets, a tight subset, a hand-worked 1-D case, and
a brute-force loop written here from the papers' definitions."""
import numpy as np
import pytest

from multistep_cm.evaluation import prdc


def _brute_force(real, fake, k):
  """The papers' definitions, one point at a time, in float64."""
  def radii(x):
    d = np.sqrt(((x[:, None] - x[None]) ** 2).sum(-1))
    return np.sort(d, axis=1)[:, k]  # index 0 is the point itself

  def dist(a, b):
    return np.sqrt(((a[:, None] - b[None]) ** 2).sum(-1))

  r_real, r_fake = radii(real), radii(fake)
  fr, rf = dist(fake, real), dist(real, fake)
  precision = np.mean([np.any(fr[j] <= r_real) for j in range(len(fake))])
  recall = np.mean([np.any(rf[i] <= r_fake) for i in range(len(real))])
  density = sum(np.sum(fr[j] <= r_real) for j in range(len(fake))) / (k * len(fake))
  coverage = np.mean([rf[i].min() < r_real[i] for i in range(len(real))])
  return {"precision": precision, "recall": recall, "density": density, "coverage": coverage}


def test_identical_sets_give_precision_recall_and_coverage_one():
  x = np.random.default_rng(0).normal(size=(300, 16))
  out = prdc.prdc(x, x, k=3)
  assert out["precision"] == 1.0 and out["recall"] == 1.0 and out["coverage"] == 1.0


def test_far_apart_sets_give_zero():
  rng = np.random.default_rng(1)
  real = rng.normal(size=(200, 8))
  fake = rng.normal(size=(150, 8)) + 1000.0
  out = prdc.prdc(real, fake)
  assert out == {"precision": 0.0, "recall": 0.0, "density": 0.0, "coverage": 0.0}


def test_a_tight_subset_is_precise_but_recalls_little():
  rng = np.random.default_rng(2)
  real = rng.normal(size=(400, 2))
  # The 40 real points nearest the origin: each is a real point (inside its own ball), and
  # their balls cover only the middle of the real cloud.
  fake = real[np.argsort(np.linalg.norm(real, axis=1))[:40]]
  out = prdc.prdc(real, fake, k=3)
  assert out["precision"] == 1.0
  assert out["recall"] < 0.5 < out["precision"]
  assert out["coverage"] == pytest.approx(40 / 400, abs=0.1)


def test_a_one_dimensional_case_worked_by_hand():
  # real 0, 1, 2, 3 (k = 1: every radius 1); fake 0.5 and 10 (both radii 9.5).
  real = np.array([[0.0], [1.0], [2.0], [3.0]])
  fake = np.array([[0.5], [10.0]])
  out = prdc.prdc(real, fake, k=1)
  # 0.5 lies in the balls of 0 and 1, 10 in none: precision 1/2, density (2 + 0) / (1 * 2).
  # Every real point is within 9.5 of 0.5: recall 1. The nearest fake (0.5) is closer than
  # 1 to real 0 and 1 only: coverage 2/4.
  assert out == {"precision": 0.5, "recall": 1.0, "density": 1.0, "coverage": 0.5}


@pytest.mark.parametrize("chunk", [7, 64, 1024])
def test_matches_brute_force_whatever_the_chunk(chunk):
  rng = np.random.default_rng(3)
  real = rng.normal(size=(90, 5))
  fake = 0.7 * rng.normal(size=(61, 5)) + 0.4
  got = prdc.prdc(real, fake, k=3, chunk=chunk)
  want = _brute_force(real, fake, 3)
  for key in want:
    assert got[key] == pytest.approx(want[key], abs=1e-12), key


def test_radii_are_the_kth_neighbour_distances():
  x = np.array([[0.0, 0.0], [3.0, 0.0], [0.0, 4.0], [10.0, 10.0]])
  # From (0, 0) the others are 3, 4 and sqrt(200) away; k = 2 takes the second: 4.
  np.testing.assert_allclose(prdc.knn_radii(x, k=2, chunk=3)[0], 4.0, rtol=1e-6)


def test_bad_inputs_are_refused():
  x = np.zeros((5, 3))
  with pytest.raises(ValueError, match="dimensions differ"):
    prdc.prdc(x, np.zeros((5, 4)))
  with pytest.raises(ValueError, match="need more"):
    prdc.prdc(x, np.zeros((3, 3)), k=3)
  with pytest.raises(ValueError, match=r"\[N, D\]"):
    prdc.prdc(np.zeros(5), x)
