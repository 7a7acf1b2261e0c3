"""Feature statistics over devices and hosts, the Fréchet distance, the Inception Score.

FID = |mu1 - mu2|^2 + tr(C1 + C2 - 2 (C1 C2)^(1/2)) between Gaussians fitted to
two feature sets (Heusel et al. 2017); IS = exp(E_x KL(p(y|x) || p(y)))
(Salimans et al. 2016). Statistics stream: each step adds a batch's count, sum
and sum of outer products, reduced over every device of every process inside
one jitted function, then summed in float64 on the host. The distance itself
is computed in float64. The device sums are of features minus a fixed shift (the first
batch's mean), added back on the host in float64: float32 sums of raw features lose the
small variances of features far from the origin (a LayerNorm'd feature such as DINOv2's
has an exactly zero-variance direction, which float32 round-off would make negative).

A statistics file is an `.npz` with `mu`, `sigma` (the keys pytorch-fid and the
ADM evaluator use), the raw moments (so files can be merged), optionally the feature
rows themselves (`features`, for the k-NN metrics of prdc.py) and a JSON metadata
entry naming the network, the weights, the data and the sample count.
"""
import functools
import itertools
import json
from typing import Any, Callable, Iterable, Mapping

import jax
from jax.experimental import multihost_utils
import jax.numpy as jnp
import numpy as np
import scipy.special

from multistep_cm.evaluation import tree_io
from multistep_cm.runtime import sharding

# Metadata keys that must agree between two statistics before a distance between them means
# anything: the same network, weights and preprocessing.
FEATURE_KEYS = ("network", "weights_sha256", "resize")


class FeatureStats:
  """Streaming count, sum and sum of outer products of feature vectors, in float64.

  Attributes:
    count: number of feature vectors added.
    sum: [F] float64 sum of the vectors.
    sum_outer: [F, F] float64 sum of x x^T.
    metadata: JSON-able dict saved alongside (network, data, sample count, ...).
    features: [count, F] float32 rows, when kept (`compute_stats(keep_features=True)`);
      else None.
  """

  def __init__(self, dim: int, metadata: Mapping[str, Any] | None = None):
    self.count = 0
    self.sum = np.zeros(dim, np.float64)
    self.sum_outer = np.zeros((dim, dim), np.float64)
    self.metadata = dict(metadata or {})
    self.features = None

  @property
  def dim(self) -> int:
    return self.sum.shape[0]

  def add_moments(self, count, total, outer):
    """Adds precomputed moments, e.g. a device-reduced batch from `batch_moments`."""
    total, outer = np.asarray(total, np.float64), np.asarray(outer, np.float64)
    if total.shape != (self.dim,) or outer.shape != (self.dim, self.dim):
      raise ValueError(f"moments of shape {total.shape}, {outer.shape} do not match dim "
                       f"{self.dim}")
    self.count += int(round(float(count)))
    self.sum += total
    self.sum_outer += outer

  def add_shifted_moments(self, count, total, outer, shift):
    """Adds moments of (x - shift) rows: count, their sum and sum of outer products."""
    total, shift = np.asarray(total, np.float64), np.asarray(shift, np.float64)
    count = float(np.asarray(count))
    cross = np.outer(shift, total)
    self.add_moments(count, total + count * shift,
                     np.asarray(outer, np.float64) + cross + cross.T
                     + count * np.outer(shift, shift))

  def add_features(self, features):
    """Adds [N, F] features on the host, in float64."""
    x = np.asarray(features, np.float64)
    self.add_moments(x.shape[0], x.sum(0), x.T @ x)

  def merge(self, other: "FeatureStats"):
    """Adds another accumulator's moments (e.g. from another run or shard), and its rows
    when both keep them (else neither is kept: rows of part of the data would mislead)."""
    both = self.features is not None and other.features is not None
    self.features = np.concatenate([self.features, other.features]) if both else None
    self.add_moments(other.count, other.sum, other.sum_outer)

  def mean_cov(self) -> tuple[np.ndarray, np.ndarray]:
    """Mean [F] and unbiased covariance [F, F] (divided by count - 1), float64."""
    if self.count < 2:
      raise ValueError(f"need at least 2 feature vectors for a covariance, have {self.count}")
    mu = self.sum / self.count
    cov = (self.sum_outer - self.count * np.outer(mu, mu)) / (self.count - 1)
    return mu, (cov + cov.T) / 2  # exact symmetry, whatever the summation order

  def save(self, path: str):
    """Writes mu, sigma, the raw moments and metadata (with num_samples) to `path`."""
    mu, sigma = self.mean_cov()
    metadata = dict(self.metadata, num_samples=self.count, feature_dim=self.dim)
    arrays = {"mu": mu, "sigma": sigma, "count": np.asarray(self.count), "sum": self.sum,
              "sum_outer": self.sum_outer}
    if self.features is not None:
      arrays["features"] = np.asarray(self.features, np.float32)
    tree_io.save(path, arrays, metadata)

  @classmethod
  def load(cls, path: str) -> "FeatureStats":
    """Reads a file written by `save`."""
    tree, metadata = tree_io.load(path)
    if "sum_outer" not in tree:
      raise ValueError(f"{path} holds no raw moments; read mu and sigma with load_mean_cov")
    stats = cls(tree["sum"].shape[0], metadata)
    stats.add_moments(tree["count"], tree["sum"], tree["sum_outer"])
    stats.features = tree.get("features")
    return stats


def load_mean_cov(path: str) -> tuple[np.ndarray, np.ndarray, dict[str, Any]]:
  """(mu, sigma, metadata) from any `.npz` with `mu` and `sigma` (ours, pytorch-fid's, ADM's)."""
  with np.load(path, allow_pickle=False) as data:
    if "mu" not in data.files or "sigma" not in data.files:
      raise ValueError(f"{path} has no 'mu' and 'sigma' entries (has {data.files[:10]})")
    mu, sigma = data["mu"].astype(np.float64), data["sigma"].astype(np.float64)
    meta = data[tree_io.METADATA_KEY] if tree_io.METADATA_KEY in data.files else None
    metadata = json.loads(str(meta)) if meta is not None else {}
  return mu, sigma, metadata


# --- Distances ----------------------------------------------------------------------------------


def _psd_sqrt(cov: np.ndarray, name: str, rtol: float) -> np.ndarray:
  """Symmetric square root of a covariance, tolerating round-off below zero."""
  evals, evecs = np.linalg.eigh(cov)
  _check_nonnegative(evals, name, rtol)
  return (evecs * np.sqrt(np.clip(evals, 0, None))) @ evecs.T


def _check_nonnegative(evals: np.ndarray, name: str, rtol: float):
  # Round-off gives eigenvalues of a PSD matrix of about -eps * dim * max|eval|; they are zeros.
  # Anything far below that means the input was not a covariance.
  tol = rtol * max(float(np.max(np.abs(evals))), np.finfo(np.float64).tiny)
  if evals.min() < -tol:
    raise ValueError(f"{name} has eigenvalue {evals.min():.3g} < -{tol:.3g}: not a covariance "
                     "(asymmetric, or not positive semi-definite)")


def trace_sqrt_product(cov1, cov2, rtol: float | None = None) -> float:
  """tr((C1 C2)^(1/2)) for covariances C1, C2, in float64.

  C1 C2 is not symmetric, so instead of a general `sqrtm` this uses that the
  eigenvalues of C1 C2 are those of C1^(1/2) C2 C1^(1/2) = A^T A with
  A = C2^(1/2) C1^(1/2): the trace is the sum of A's singular values (its
  nuclear norm). Taking singular values, rather than square roots of
  eigenvalues, keeps round-off near zero from growing to sqrt(eps), which
  matters for the singular covariances of fewer samples than dimensions.
  Eigenvalues of C1, C2 in [-rtol * max, 0) are round-off and count as 0;
  lower ones raise ValueError. The default rtol, dim x float32's eps, is the round-off of
  moments summed on the device in float32 (`batch_moments`): a singular covariance of
  fewer samples than dimensions has eigenvalues that far below zero (in-training FID of
  1000 samples in 2048 Inception features is one).
  """
  if rtol is None:
    rtol = np.shape(cov1)[0] * float(np.finfo(np.float32).eps)
  root1 = _psd_sqrt(np.asarray(cov1, np.float64), "cov1", rtol)
  root2 = _psd_sqrt(np.asarray(cov2, np.float64), "cov2", rtol)
  return float(np.sum(np.linalg.svd(root2 @ root1, compute_uv=False)))


def frechet_distance(mu1, cov1, mu2, cov2) -> float:
  """Fréchet distance between N(mu1, cov1) and N(mu2, cov2), in float64."""
  mu1, mu2 = np.asarray(mu1, np.float64), np.asarray(mu2, np.float64)
  cov1, cov2 = np.asarray(cov1, np.float64), np.asarray(cov2, np.float64)
  dim = mu1.shape[0] if mu1.ndim == 1 else -1
  if mu1.shape != mu2.shape or cov1.shape != (dim, dim) or cov2.shape != (dim, dim):
    raise ValueError(f"shapes do not match: mu {mu1.shape}, {mu2.shape}; cov {cov1.shape}, "
                     f"{cov2.shape}")
  diff = mu1 - mu2
  return float(diff @ diff + np.trace(cov1) + np.trace(cov2)
               - 2 * trace_sqrt_product(cov1, cov2))


def inception_score(logits, splits: int = 10) -> tuple[float, float]:
  """Inception Score: mean and std over `splits` contiguous chunks, as Salimans et al.

  Args:
    logits: [N, C] classifier logits (the FID network's 1008, or any classifier's).
    splits: number of chunks; the score is exp(mean_x KL(p(y|x) || p(y))) per chunk.
  """
  log_p = scipy.special.log_softmax(np.asarray(logits, np.float64), axis=-1)
  n = log_p.shape[0]
  if n < splits:
    raise ValueError(f"need at least {splits} samples for {splits} splits, have {n}")
  scores = []
  for i in range(splits):
    part = log_p[i * n // splits:(i + 1) * n // splits]
    log_marginal = scipy.special.logsumexp(part, axis=0) - np.log(len(part))
    kl = np.sum(np.exp(part) * (part - log_marginal), axis=1)
    scores.append(np.exp(np.mean(kl)))
  return float(np.mean(scores)), float(np.std(scores))


def check_comparable(samples: FeatureStats, reference: FeatureStats):
  """Raises ValueError unless both were measured with the same network, weights and
  preprocessing (FEATURE_KEYS) into features of one dimension."""
  if samples.dim != reference.dim:
    raise ValueError(f"feature dimensions differ: {samples.dim} vs {reference.dim}")
  for key in FEATURE_KEYS:
    a, b = samples.metadata.get(key), reference.metadata.get(key)
    if a != b:
      raise ValueError(f"samples and reference statistics differ in {key!r}: {a!r} vs {b!r}")


def fid_report(samples: FeatureStats, reference: FeatureStats) -> dict[str, Any]:
  """FID between two statistics, with everything needed to reproduce the number.

  Raises ValueError when the two were not measured with the same network,
  weights and preprocessing (FEATURE_KEYS), the most common reason FIDs differ.
  The samples' metadata should say which parameters made them (EMA or raw,
  checkpoint step) and the sampler; it is passed through.
  """
  check_comparable(samples, reference)
  fd = frechet_distance(*samples.mean_cov(), *reference.mean_cov())
  return {
      "fid": fd,
      "num_samples": samples.count,
      "reference_num_samples": reference.count,
      "feature_dim": samples.dim,
      **{key: samples.metadata.get(key) for key in FEATURE_KEYS},
      "samples": dict(samples.metadata, num_samples=samples.count),
      "reference": dict(reference.metadata, num_samples=reference.count),
  }


# --- Accumulation over devices and hosts --------------------------------------------------------


def batch_moments(features, mask, shift=None):
  """(count, sum, sum of outer products) of the rows of `features` (minus `shift`, [F],
  when given) where `mask` is 1.

  Jittable. With `features` sharded over devices the sums are reduced over all
  of them (across processes too) by the compiler.
  """
  mask = mask.astype(jnp.float32)
  x = features.astype(jnp.float32)
  if shift is not None:
    x = x - shift.astype(jnp.float32)
  x = x * mask[:, None]
  # HIGHEST: TPUs otherwise multiply float32 in bfloat16 passes, too coarse for a covariance.
  outer = jnp.einsum("ni,nj->ij", x, x, precision=jax.lax.Precision.HIGHEST)
  return jnp.sum(mask), jnp.sum(x, axis=0), outer


def _local_value(x: jax.Array) -> np.ndarray:
  """A replicated global array's value, on any process."""
  return np.asarray(x.addressable_data(0))


def _gather_rows(x: jax.Array) -> np.ndarray:
  """A batch-sharded global array, gathered to the host of every process."""
  if jax.process_count() == 1:
    return np.asarray(x)
  return np.asarray(multihost_utils.process_allgather(x, tiled=True))


@functools.lru_cache(maxsize=16)
def _compiled_step(apply_fn, keep_logits: bool, keep_features: bool,
                   replicated: jax.sharding.NamedSharding):
  """One jitted step per network function and outputs kept, so later calls with the same
  `apply_fn` (every row of a report) reuse its compilation."""

  @jax.jit
  def step(variables, images, mask, shift):
    out = apply_fn(variables, images)
    moments = jax.lax.with_sharding_constraint(batch_moments(out["features"], mask, shift),
                                               replicated)
    return (moments, out["logits"] if keep_logits else None,
            out["features"] if keep_features else None)

  return step


def compute_stats(apply_fn: Callable[..., Mapping[str, jax.Array]], variables,
                  batches: Iterable[np.ndarray], *, batch_size: int,
                  num_batches: int | None = None, mesh: jax.sharding.Mesh | None = None,
                  keep_logits: bool = False, metadata: Mapping[str, Any] | None = None,
                  progress: bool = False, keep_features: bool = False
                  ) -> tuple[FeatureStats, np.ndarray | None]:
  """Streams this process's image batches through `apply_fn` on all devices.

  Args:
    apply_fn: `(variables, images) -> {"features": [B, F], "logits": [B, C]}`,
      jittable ("logits" only needed with keep_logits).
    variables: its parameters; replicated over the mesh.
    batches: this process's batches, numpy [b, ...] with b <= batch_size (the
      last may be short; it is padded and the padding masked out).
    batch_size: rows per process and step; a multiple of the local device count.
    num_batches: steps to run. Needed on multi-process jobs, where every process
      must run the same number of steps: processes whose batches run out early
      feed fully masked batches. Defaults to the length of `batches`.
    mesh: the devices to use (the batch is split over all of them); default all.
    keep_logits: also return the logits of every real row, gathered to the host
      in process order (e.g. for `inception_score`).
    metadata: stored on the returned FeatureStats.
    progress: show a tqdm bar on process 0.
    keep_features: also keep every real row's features on the returned stats
      (`FeatureStats.features`, gathered like the logits).

  Returns:
    (FeatureStats over the real rows of every process, logits [N, C] or None).
  """
  # Auto axes whatever the caller's mesh: the compiler then places the cross-device reductions,
  # and the batch is split over every device (all mesh axes).
  mesh = sharding.data_mesh(None if mesh is None else mesh.devices.flatten())
  if batch_size % jax.local_device_count():
    raise ValueError(f"batch_size {batch_size} must be a multiple of the local device count "
                     f"{jax.local_device_count()}")
  if jax.process_count() > 1 and num_batches is None:
    raise ValueError("num_batches is required on multi-process jobs so every process runs "
                     "the same number of steps")
  row = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec(mesh.axis_names))
  replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
  variables = jax.device_put(variables, replicated)

  step = _compiled_step(apply_fn, keep_logits, keep_features, replicated)
  stats, logits, rows, template, shift = None, [], [], None, None
  iterator = iter(batches)
  steps = range(num_batches) if num_batches is not None else itertools.count()
  if progress and jax.process_index() == 0:
    import tqdm  # pylint: disable=g-import-not-at-top
    steps = tqdm.tqdm(steps, total=num_batches, desc="features", unit="batch")
  for _ in steps:
    local = next(iterator, None)
    if local is None:
      if num_batches is None:
        break
      if template is None:
        raise ValueError("this process received no batches; cannot infer the image shape")
      local = template[:0]  # out of data: a fully masked step keeps processes in lockstep
    local = np.asarray(local)
    if template is None:
      template = local
    n = local.shape[0]
    if n > batch_size:
      raise ValueError(f"a batch has {n} rows, more than batch_size {batch_size}")
    padded = np.zeros((batch_size,) + template.shape[1:], template.dtype)
    padded[:n] = local
    mask = (np.arange(batch_size) < n).astype(np.float32)
    images = jax.make_array_from_process_local_data(row, padded)
    mask_global = jax.make_array_from_process_local_data(row, mask)
    if shift is None:
      # The first batch's mean (over every process) becomes the shift; that batch is then
      # run again with it, by the same compiled step.
      dim = jax.eval_shape(apply_fn, variables, images)["features"].shape[-1]
      zero = jax.device_put(np.zeros(dim, np.float32), replicated)
      (count, total, _), _, _ = step(variables, images, mask_global, zero)
      count, total = float(_local_value(count)), _local_value(total)
      shift = (total / count if count else np.zeros(dim)).astype(np.float32)
      shift_global = jax.device_put(shift, replicated)
      stats = FeatureStats(dim, metadata)
    (count, total, outer), batch_logits, batch_rows = step(variables, images, mask_global,
                                                           shift_global)
    stats.add_shifted_moments(_local_value(count), _local_value(total), _local_value(outer),
                              shift)
    if keep_logits or keep_features:
      keep = _gather_rows(mask_global) > 0
    if keep_logits:
      logits.append(_gather_rows(batch_logits)[keep])
    if keep_features:
      rows.append(_gather_rows(batch_rows)[keep].astype(np.float32))
  if stats is None:
    raise ValueError("no batches to compute statistics from")
  if keep_features:
    stats.features = np.concatenate(rows)
  return stats, (np.concatenate(logits) if keep_logits else None)
