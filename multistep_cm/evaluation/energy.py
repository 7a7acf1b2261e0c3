"""Energy distance between two samples: the toy experiments' distribution metric.

`ED(P, Q) = 2 E||X - Y|| - E||X - X'|| - E||Y - Y'||` (Szekely & Rizzo), zero iff
P = Q. The within-sample terms exclude the diagonal (U-statistics), so the
estimate is unbiased: for two samples of one distribution it scatters around 0
with a spread of order 1/n.
"""
import functools

import jax
import jax.numpy as jnp
import numpy as np


@functools.partial(jax.jit, static_argnames=("block",))
def _sum_pairwise_distance(a, b, block: int = 1024):
  """Sum over all pairs of ||a_i - b_j||, in blocks of `a` so memory stays O(block * n)."""
  n = a.shape[0]
  pad = (-n) % block
  a_pad = jnp.concatenate([a, jnp.zeros((pad,) + a.shape[1:], a.dtype)])
  mask = jnp.concatenate([jnp.ones((n,)), jnp.zeros((pad,))]).reshape(-1, block)
  b_sq = jnp.sum(jnp.square(b), -1)

  def one(carry, blk):
    rows, m = blk
    d2 = jnp.sum(jnp.square(rows), -1)[:, None] + b_sq[None] - 2.0 * rows @ b.T
    dist = jnp.sqrt(jnp.maximum(d2, 0.0))
    return carry + jnp.sum(dist * m[:, None]), None

  total, _ = jax.lax.scan(one, jnp.float32(0.0), (a_pad.reshape((-1, block) + a.shape[1:]), mask))
  return total


def energy_distance(x, y) -> float:
  """Unbiased energy distance between samples `x [n, D]` and `y [m, D]` (any data shape)."""
  x = jnp.asarray(x, jnp.float32).reshape(len(x), -1)
  y = jnp.asarray(y, jnp.float32).reshape(len(y), -1)
  n, m = x.shape[0], y.shape[0]
  if n < 2 or m < 2:
    raise ValueError(f"energy distance needs at least 2 points per sample, got {n} and {m}")
  xy = float(_sum_pairwise_distance(x, y)) / (n * m)
  # The diagonal of the within-sample sums is zero, so dividing by n (n - 1) drops it.
  xx = float(_sum_pairwise_distance(x, x)) / (n * (n - 1))
  yy = float(_sum_pairwise_distance(y, y)) / (m * (m - 1))
  return float(np.float64(2.0 * xy - xx - yy))
