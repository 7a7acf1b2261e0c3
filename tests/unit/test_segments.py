"""Segment boundaries and the teacher grid: definitions, nesting, snapping, any-step grids."""
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from multistep_cm.diffusion import losses
from multistep_cm.diffusion import schedules
from multistep_cm.diffusion import segments

COSINE = schedules.cosine()
IN64 = schedules.interpolated_cosine(64, 32)


def logsnr(schedule, t):
  return np.asarray(schedule.logsnr(jnp.asarray(t, jnp.float32)), np.float64)


@pytest.mark.parametrize("schedule", [COSINE, IN64])
def test_boundary_kinds_follow_their_definitions(schedule):
  s = 8
  np.testing.assert_allclose(segments.boundaries("uniform", s, schedule), np.arange(9) / 8)
  b = segments.boundaries("logsnr", s, schedule)
  # Equal steps in logSNR between the two ends.
  np.testing.assert_allclose(np.diff(logsnr(schedule, b[1:-1])),
                             (logsnr(schedule, 1.0) - logsnr(schedule, 0.0)) / s, rtol=2e-3)
  b = segments.boundaries("karras", s, schedule)
  sigma = np.exp(-logsnr(schedule, b[1:-1]) / 2)
  # sigma^(1/rho) is linear in k between EDM's clipped range ends.
  lo = max(math.exp(-logsnr(schedule, 0.0) / 2), segments.KARRAS_SIGMA_MIN)
  hi = min(math.exp(-logsnr(schedule, 1.0) / 2), segments.KARRAS_SIGMA_MAX)
  r = 1 / segments.KARRAS_RHO
  expect = lo ** r + np.arange(1, s) / s * (hi ** r - lo ** r)
  np.testing.assert_allclose(sigma ** r, expect, rtol=2e-3)
  for kind in segments.KINDS:
    b = segments.boundaries(kind, s, schedule)
    assert b[0] == 0 and b[-1] == 1 and np.all(np.diff(b) > 0)


@pytest.mark.parametrize("kind", segments.KINDS)
def test_boundaries_are_nested_across_step_counts(kind):
  for s in (1, 2, 4, 8):
    np.testing.assert_allclose(segments.boundaries(kind, 2 * s, COSINE)[::2],
                               segments.boundaries(kind, s, COSINE), atol=1e-9)


def test_explicit_boundaries_are_validated():
  np.testing.assert_array_equal(segments.boundaries([0, 0.3, 1], 2, COSINE), [0, 0.3, 1])
  for bad in ([0, 0.3, 0.9], [0, 0.6, 0.5, 1], [0.1, 1]):
    with pytest.raises(ValueError, match="explicit boundaries"):
      segments.boundaries(bad, len(bad) - 1 if len(bad) != 2 else 2, COSINE)
  with pytest.raises(ValueError, match="must be one of"):
    segments.boundaries("cosine", 2, COSINE)


def test_grid_bounds_snap_to_the_nearest_step_and_keep_every_segment():
  np.testing.assert_array_equal(segments.grid_bounds(np.arange(5) / 4, 1280),
                                [0, 320, 640, 960, 1280])
  np.testing.assert_array_equal(segments.grid_bounds([0, 0.26, 0.74, 1], 100), [0, 26, 74, 100])
  # Squeezed boundaries are pushed apart by the least amount, both at the bottom and the top.
  np.testing.assert_array_equal(segments.grid_bounds([0, 0.001, 0.002, 0.5, 1], 8),
                                [0, 1, 2, 4, 8])
  np.testing.assert_array_equal(segments.grid_bounds([0, 0.5, 0.999, 0.9995, 1], 8),
                                [0, 4, 6, 7, 8])
  np.testing.assert_array_equal(segments.grid_bounds([0, 0.5, 0.5, 0.5, 1], 4), [0, 1, 2, 3, 4])


def test_uniform_grid_is_the_papers():
  """Equal segments of N_per_segment steps, T = N_per_segment * S (§3.1)."""
  grid = losses.make_grid(jnp.float32(1280), 8)
  np.testing.assert_array_equal(grid.bounds, np.arange(9) * 160)
  assert int(grid.num_steps) == 1280
  snapped = losses.make_grid(jnp.float32(1280), 8, segments.boundaries("uniform", 8, COSINE))
  np.testing.assert_array_equal(snapped.bounds, grid.bounds)


def test_segment_draws_cover_each_segments_grid_points_exactly():
  b = segments.boundaries("karras", 4, COSINE)
  grid = losses.make_grid(jnp.float32(64), 4, b)
  bounds = np.asarray(grid.bounds)
  segment, n_rel = losses.sample_segments(jax.random.PRNGKey(0), 20_000, grid)
  t_step, t, s = losses.segment_times(segment, n_rel, grid)
  seen = set(np.round(np.asarray(t) * 64).astype(int))
  assert seen == set(range(1, 65))  # every grid point of (0, 1] is drawn
  idx = np.asarray(segment)
  np.testing.assert_array_equal(np.round(np.asarray(t_step) * 64), bounds[idx])
  assert np.all(np.asarray(t) * 64 <= bounds[idx + 1] + 1e-4)
  np.testing.assert_allclose(np.asarray(t) - np.asarray(s), 1 / 64, rtol=1e-5)
  # Every segment equally likely, whatever its length (as the paper's uniform step draw).
  counts = np.bincount(idx, minlength=4)
  assert counts.min() > 0.9 * counts.max()


def test_anystep_grid_gives_each_example_its_own_nested_segments():
  counts = (1, 2, 4, 8)
  choice = jnp.asarray(np.arange(400) % 4)
  grid = losses.make_anystep_grid(jnp.float32(1280), counts, [None] * 4, choice)
  assert int(grid.num_steps) == 1280
  np.testing.assert_array_equal(grid.student_steps, np.asarray(counts)[np.asarray(choice)])
  segment, n_rel = losses.sample_segments(jax.random.PRNGKey(1), 400, grid)
  t_step, t, _ = losses.segment_times(segment, n_rel, grid)
  s_of = np.asarray(grid.student_steps)
  assert np.all(np.asarray(segment) < s_of)
  # t_step is a boundary k / S of the example's own S; t lies in that segment.
  k = np.asarray(t_step) * s_of
  np.testing.assert_allclose(k, np.round(k), atol=1e-4)
  assert np.all(np.asarray(t) > np.asarray(t_step))
  assert np.all(np.asarray(t) <= np.asarray(t_step) + 1 / s_of + 1e-6)
  # A single step count reproduces make_grid.
  one = losses.make_anystep_grid(jnp.float32(1280), (4,), [None], jnp.zeros(3, jnp.int32))
  np.testing.assert_array_equal(one.bounds[0], losses.make_grid(jnp.float32(1280), 4).bounds)
