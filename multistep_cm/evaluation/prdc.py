"""Precision, recall, density and coverage of samples against real data, in feature space.

Precision and recall are the k-nearest-neighbour manifold estimates of Kynkäänniemi et al.
2019 ("Improved precision and recall metric for assessing generative models"): a set's
manifold is the union of balls around its points, each of radius the distance to that
point's k-th nearest neighbour in the same set. Precision is the fraction of fake points
inside the real manifold (are the samples realistic?); recall the fraction of real points
inside the fake manifold (are all kinds of real data produced?). Density and coverage are
Naeem et al. 2020's ("Reliable fidelity and diversity metrics for generative models"):
density counts how many real balls hold each fake point, divided by k; coverage is the
fraction of real balls that hold a fake point at all.

Distances are computed on the device a block of rows at a time (`chunk` rows against the
whole other set), so 50k x 50k needs `chunk` x 50k floats at once, never 50k^2.
"""
import functools

import jax
import jax.numpy as jnp
import numpy as np

DEFAULT_K = 3
DEFAULT_CHUNK = 1024


@jax.jit
def _squared_distances(a, b):
  """[n, m] squared Euclidean distances, float32, exact to round-off (no bf16 passes)."""
  cross = jnp.einsum("nd,md->nm", a, b, precision=jax.lax.Precision.HIGHEST)
  sq = jnp.sum(a * a, axis=1)[:, None] + jnp.sum(b * b, axis=1)[None, :] - 2 * cross
  return jnp.maximum(sq, 0.0)


@functools.partial(jax.jit, static_argnames="k")
def _kth_neighbour(rows, points, *, k):
  """Squared distance from each row to its k-th nearest neighbour among `points` (which
  hold the rows themselves: their own zero distance is the first of the k + 1)."""
  neg, _ = jax.lax.top_k(-_squared_distances(rows, points), k + 1)
  return -neg[:, k]


@jax.jit
def _ball_counts(rows, centres, radii_sq):
  """For each row: how many of the balls (centres, squared radii) hold it, and its squared
  distance to the nearest centre."""
  sq = _squared_distances(rows, centres)
  return jnp.sum(sq <= radii_sq[None, :], axis=1), jnp.min(sq, axis=1)


def _by_chunks(fn, rows: np.ndarray, chunk: int, *args):
  """`fn(rows[block], *args)` over blocks of `chunk` rows, concatenated on the host. The
  last block is padded to `chunk` so one compilation serves every block."""
  outs = []
  for start in range(0, len(rows), chunk):
    block = rows[start:start + chunk]
    n = len(block)
    if n < chunk:
      block = np.concatenate([block, np.zeros((chunk - n,) + block.shape[1:], block.dtype)])
    result = fn(jnp.asarray(block), *args)
    outs.append(jax.tree.map(lambda x, n=n: np.asarray(x)[:n], result))
  return jax.tree.map(lambda *xs: np.concatenate(xs), *outs)


def _check(name: str, x, k: int) -> np.ndarray:
  x = np.asarray(x, np.float32)
  if x.ndim != 2:
    raise ValueError(f"{name} features must be [N, D], got shape {x.shape}")
  if len(x) <= k:
    raise ValueError(f"{name} has {len(x)} points; k = {k} nearest neighbours need more")
  return x


def knn_radii(features, k: int = DEFAULT_K, chunk: int = DEFAULT_CHUNK) -> np.ndarray:
  """[N] distance from each point to its k-th nearest other point of the same set."""
  x = _check("the", features, k)
  points = jnp.asarray(x)
  sq = _by_chunks(functools.partial(_kth_neighbour, k=k), x, min(chunk, len(x)), points)
  return np.sqrt(sq)


def prdc(real, fake, k: int = DEFAULT_K, chunk: int = DEFAULT_CHUNK) -> dict[str, float]:
  """{"precision", "recall", "density", "coverage"} of `fake` [M, D] against `real` [N, D].

  A point is inside a ball when its distance is at most the radius (<=), as
  Kynkäänniemi et al.; coverage asks for strictly less, as Naeem et al.
  """
  real, fake = _check("real", real, k), _check("fake", fake, k)
  if real.shape[1] != fake.shape[1]:
    raise ValueError(f"feature dimensions differ: real {real.shape[1]}, fake {fake.shape[1]}")
  real_sq = np.square(knn_radii(real, k, chunk))
  fake_sq = np.square(knn_radii(fake, k, chunk))
  real_dev, fake_dev = jnp.asarray(real), jnp.asarray(fake)
  in_real, _ = _by_chunks(_ball_counts, fake, min(chunk, len(fake)), real_dev,
                          jnp.asarray(real_sq))
  in_fake, nearest_fake_sq = _by_chunks(_ball_counts, real, min(chunk, len(real)), fake_dev,
                                        jnp.asarray(fake_sq))
  return {
      "precision": float(np.mean(in_real > 0)),
      "recall": float(np.mean(in_fake > 0)),
      "density": float(np.sum(in_real) / (k * len(fake))),
      "coverage": float(np.mean(nearest_fake_sq < real_sq)),
  }
