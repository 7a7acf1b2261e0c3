"""A sample-quality metric that runs anywhere: a small CNN trained on the embedded digits.

  python -m multistep_cm.evaluation.digits_metric --train --image_size 8 [--sanity]

The classifier is trained here, deterministically from a fixed seed (on the
CPU backend, in seconds), and cached as
`<cache>/digits_classifier_<S>px_<settings hash>.npz`, where <cache> is the
`cache_dir` argument, else $MULTISTEP_CM_CACHE, else ~/.cache/multistep_cm.
Changing any training setting or the image size changes the hash, so a stale
classifier is never reused; nothing is downloaded.

`digits_metrics(images, labels)` reports, for digit samples in [-1, 1]:
  fd             Fréchet distance between the classifier's penultimate features
                 of the samples and of a held-out digits split (float64). Like
                 FID it is biased by the sample count: compare at equal counts.
  accuracy       fraction of samples classified as their conditioning label.
  label_entropy  entropy (nats) of the mean predicted class distribution;
                 log 10 = 2.303 when all ten digits are produced equally often.
  confidence     mean top-class probability.
and names the classifier (settings hash, weights digest, test accuracy) and
the reference split, so a report says what was measured.

Measured 2026-11-22 on a shared 2-core CPU machine with
`python -m multistep_cm.evaluation.digits_metric --train --sanity --image_size S`
(the default settings; 359 held-out test digits, FD against the train split):

  S   test accuracy  training   FD real / blurred / N(0,1) / U(-1,1) noise
  8   98.9%          14 s       19.6 / 1107 / 872 / 1460
  16  98.6%          25 s       57.6 /  392 / 6105 / 7181

The accuracy is also stored in the cache file and returned as
`classifier_test_accuracy`.
"""
import argparse
import dataclasses
import functools
import hashlib
import json
import os
import time
from typing import Any, Callable, Mapping, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import scipy.special

from multistep_cm.data import digits
from multistep_cm.evaluation import fid
from multistep_cm.evaluation import tree_io

CACHE_ENV = "MULTISTEP_CM_CACHE"
DEFAULT_CACHE_DIR = os.path.join("~", ".cache", "multistep_cm")
REFERENCE_SPLITS = ("test", "train", "all")
# Bump `version` when the architecture or the training code changes meaning: it enters the hash.
DEFAULT_SETTINGS = {
    "version": 1,
    "width": 32,
    "feature_dim": 64,
    "epochs": 40,
    "batch_size": 64,
    "learning_rate": 2e-3,
    "weight_decay": 1e-4,
    "seed": 0,
    "train_split": "train",
}
_EVAL_CHUNK = 512  # rows per jitted call; inputs are padded to it so one compilation serves all


class DigitsCNN(nn.Module):
  """Conv pairs with 2x average pooling down to 4x4, then a dense feature layer and the class
  logits (one unused logit where there are no classes: the folder metric's unlabelled
  data, evaluation/folder_metric.py)."""
  width: int = 32
  feature_dim: int = 64
  num_classes: int = digits.NUM_CLASSES

  @nn.compact
  def __call__(self, x):
    """x: [N, S, S, C] in [-1, 1], S a power of 2 -> (logits [N, classes], features [N, F])."""
    channels = self.width
    x = nn.relu(nn.Conv(channels, (3, 3))(x))
    while x.shape[1] > 4:
      x = nn.relu(nn.Conv(channels, (3, 3))(x))
      x = nn.avg_pool(x, (2, 2), strides=(2, 2))
      channels *= 2
      x = nn.relu(nn.Conv(channels, (3, 3))(x))
    # The features are the penultimate layer before its ReLU: after it, units that are zero on
    # every digit would make the covariance singular and carry no information.
    features = nn.Dense(self.feature_dim)(x.reshape(x.shape[0], -1))
    return nn.Dense(max(self.num_classes, 1))(nn.relu(features)), features


def settings_for(image_size: int, settings: Mapping[str, Any] | None = None) -> dict[str, Any]:
  return dict(DEFAULT_SETTINGS if settings is None else settings, image_size=image_size)


def settings_hash(settings: Mapping[str, Any]) -> str:
  return hashlib.sha256(json.dumps(dict(settings), sort_keys=True).encode()).hexdigest()[:12]


def cache_dir_path(cache_dir: str | None = None) -> str:
  return os.path.expanduser(cache_dir or os.environ.get(CACHE_ENV) or DEFAULT_CACHE_DIR)


@dataclasses.dataclass(frozen=True, eq=False)
class DigitsClassifier:
  """A trained `DigitsCNN` and what identifies it."""
  params: Any
  settings: Mapping[str, Any]
  metadata: Mapping[str, Any]  # settings_hash, weights_sha256, test_accuracy, ...

  @property
  def image_size(self) -> int:
    return int(self.settings["image_size"])

  @property
  def name(self) -> str:
    return f"digits-cnn-{self.image_size}px-{self.metadata['settings_hash']}"

  def _model(self) -> DigitsCNN:
    return DigitsCNN(self.settings["width"], self.settings["feature_dim"])

  def logits_and_features(self, images) -> tuple[np.ndarray, np.ndarray]:
    """images [N, S, S, 1] in [-1, 1] (clipped to it) -> (logits [N, 10], features [N, F])."""
    images = np.asarray(images, np.float32)
    s = self.image_size
    if images.ndim != 4 or images.shape[1:] != (s, s, 1):
      raise ValueError(f"{self.name} takes images [N, {s}, {s}, 1], got {images.shape}")
    # Samples are judged as displayable images: values past the data range are clipped, as
    # they would be when saved.
    images = np.clip(images, -1.0, 1.0)
    apply = _jitted_apply(self._model())
    logits, features = [], []
    for start in range(0, len(images), _EVAL_CHUNK):
      chunk = images[start:start + _EVAL_CHUNK]
      padded = np.zeros((_EVAL_CHUNK,) + chunk.shape[1:], np.float32)
      padded[:len(chunk)] = chunk
      out_logits, out_features = apply(self.params, padded)
      logits.append(np.asarray(out_logits)[:len(chunk)])
      features.append(np.asarray(out_features)[:len(chunk)])
    return np.concatenate(logits), np.concatenate(features)

  def features(self, images) -> np.ndarray:
    """Penultimate-layer features [N, F], before the ReLU (the space of `fd`)."""
    return self.logits_and_features(images)[1]

  def predict(self, images) -> np.ndarray:
    """Class probabilities [N, 10], float64."""
    return scipy.special.softmax(self.logits_and_features(images)[0].astype(np.float64), axis=-1)


@functools.lru_cache(maxsize=None)
def _jitted_apply(model: DigitsCNN):
  return jax.jit(model.apply)


def _cpu_device():
  # Training on the CPU backend keeps the cached classifier the same whichever accelerator the
  # job has; the weights digest in every report catches any remaining difference.
  try:
    return jax.local_devices(backend="cpu")[0]
  except RuntimeError:  # JAX_PLATFORMS excludes the CPU backend
    return jax.local_devices()[0]


def train_classifier(image_size: int, settings: Mapping[str, Any] | None = None
                     ) -> DigitsClassifier:
  """Trains a `DigitsCNN` on the digits train split, deterministically; no caching."""
  settings = settings_for(image_size, settings)
  start = time.time()
  x_train, y_train = digits.load_digits(settings["train_split"], image_size)
  model = DigitsCNN(settings["width"], settings["feature_dim"])
  optimizer = optax.adamw(settings["learning_rate"], weight_decay=settings["weight_decay"])

  def loss_fn(params, x, y):
    logits, _ = model.apply(params, x)
    return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()

  # One jitted step in a Python loop: XLA:CPU runs convolutions inside `lax.scan` ~50x slower.
  @jax.jit
  def train_step(params, opt_state, x, y):
    grads = jax.grad(loss_fn)(params, x, y)
    updates, opt_state = optimizer.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state

  batch = settings["batch_size"]
  steps = len(x_train) // batch  # the remainder changes each epoch with the shuffle
  rng = np.random.default_rng(settings["seed"])
  with jax.default_device(_cpu_device()):
    params = model.init(jax.random.key(settings["seed"]), x_train[:1])
    opt_state = optimizer.init(params)
    for _ in range(settings["epochs"]):
      order = rng.permutation(len(x_train))[:steps * batch].reshape(steps, batch)
      for idx in order:
        params, opt_state = train_step(params, opt_state, x_train[idx], y_train[idx])
    params = jax.device_get(params)
  metadata = {
      "settings_hash": settings_hash(settings),
      "weights_sha256": tree_io.digest(params),
      "train_seconds": round(time.time() - start, 2),
  }
  classifier = DigitsClassifier(params, settings, metadata)
  for split in ("train", "test"):
    x, y = digits.load_digits(split, image_size)
    accuracy = float(np.mean(np.argmax(classifier.logits_and_features(x)[0], -1) == y))
    metadata[f"{split}_accuracy"] = accuracy
  return classifier


def classifier_path(image_size: int, settings: Mapping[str, Any] | None = None,
                    cache_dir: str | None = None) -> str:
  settings = settings_for(image_size, settings)
  name = f"digits_classifier_{image_size}px_{settings_hash(settings)}.npz"
  return os.path.join(cache_dir_path(cache_dir), name)


def cached_classifier(path: str, train: Callable[[], Any], wrap: Callable[..., Any],
                      what: str, verbose: bool = False):
  """The classifier stored at `path` as `wrap(params, settings, metadata)`; if absent,
  `train()` makes it (announced as `what` when `verbose`) and it is stored there first."""
  if os.path.exists(path):
    params, stored = tree_io.load(path)
    return wrap(params, stored["settings"], stored["metadata"])
  if verbose:
    print(f"training {what} -> {path}")
  classifier = train()
  tree_io.save(path, classifier.params,
               {"settings": classifier.settings, "metadata": classifier.metadata})
  return classifier


def load_or_train_classifier(image_size: int = 8, cache_dir: str | None = None,
                             settings: Mapping[str, Any] | None = None,
                             verbose: bool = False) -> DigitsClassifier:
  """The cached classifier for `image_size`, trained and cached first if absent."""
  return cached_classifier(classifier_path(image_size, settings, cache_dir),
                           lambda: train_classifier(image_size, settings), DigitsClassifier,
                           f"the digits classifier ({image_size}x{image_size})", verbose)


@functools.lru_cache(maxsize=16)
def _reference_stats(classifier: DigitsClassifier, reference: str) -> fid.FeatureStats:
  images, _ = digits.load_digits(reference, classifier.image_size)
  stats = fid.FeatureStats(classifier.settings["feature_dim"])
  stats.add_features(classifier.features(images))
  return stats


def digits_metrics(images, labels=None, reference: str = "test",
                   classifier: DigitsClassifier | None = None,
                   cache_dir: str | None = None) -> dict[str, Any]:
  """Classifier-based quality metrics of digit samples (see the module docstring).

  Args:
    images: [N, S, S, 1] samples in [-1, 1], S the classifier's size (8 or 16).
    labels: optional int [N] conditioning labels, for `accuracy`.
    reference: digits split whose features `fd` compares against: "test"
      (held out from the classifier's training), "train" or "all".
    classifier: defaults to `load_or_train_classifier(S, cache_dir)`.
    cache_dir: where the classifier is cached (see the module docstring).
  """
  if reference not in REFERENCE_SPLITS:
    raise ValueError(f"reference must be one of {REFERENCE_SPLITS}, got {reference!r}")
  images = np.asarray(images)
  if images.ndim != 4:
    raise ValueError(f"images must be [N, S, S, 1], got {images.shape}")
  if classifier is None:
    classifier = load_or_train_classifier(images.shape[1], cache_dir)
  logits, features = classifier.logits_and_features(images)
  samples = fid.FeatureStats(features.shape[1])
  samples.add_features(features)
  ref = _reference_stats(classifier, reference)
  probs = scipy.special.softmax(logits.astype(np.float64), axis=-1)
  marginal = probs.mean(axis=0)
  result = {
      "fd": fid.frechet_distance(*samples.mean_cov(), *ref.mean_cov()),
      "label_entropy": float(-np.sum(marginal * np.log(np.clip(marginal, 1e-300, None)))),
      "max_label_entropy": float(np.log(digits.NUM_CLASSES)),
      "confidence": float(np.mean(probs.max(axis=-1))),
      "num_samples": int(len(images)),
      "classifier": classifier.name,
      "classifier_weights_sha256": classifier.metadata["weights_sha256"],
      "classifier_test_accuracy": classifier.metadata.get("test_accuracy"),
      "reference": f"digits/{reference} at {classifier.image_size}x{classifier.image_size}",
      "reference_num_samples": ref.count,
  }
  if labels is not None:
    labels = np.asarray(labels)
    if labels.shape != (len(images),):
      raise ValueError(f"labels must be [{len(images)}], got {labels.shape}")
    result["accuracy"] = float(np.mean(np.argmax(probs, axis=-1) == labels))
  return result


def _box_blur(images: np.ndarray) -> np.ndarray:
  padded = np.pad(images, ((0, 0), (1, 1), (1, 1), (0, 0)), mode="edge")
  s = images.shape[1]
  return sum(padded[:, i:i + s, j:j + s] for i in range(3) for j in range(3)) / 9.0


def sanity_table(image_size: int, cache_dir: str | None = None) -> dict[str, dict[str, Any]]:
  """Metrics of held-out digits vs noise and blur, against the train split's statistics."""
  classifier = load_or_train_classifier(image_size, cache_dir)
  x, y = digits.load_digits("test", image_size)
  rng = np.random.default_rng(0)
  cases = {
      "real test digits": x,
      "3x3 box-blurred test digits": _box_blur(x),
      "gaussian noise N(0,1)": rng.normal(size=x.shape).astype(np.float32),
      "uniform noise U(-1,1)": rng.uniform(-1, 1, size=x.shape).astype(np.float32),
  }
  return {name: digits_metrics(images, y, reference="train", classifier=classifier)
          for name, images in cases.items()}


def main(argv: Sequence[str] | None = None):
  parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
  parser.add_argument("--train", action="store_true",
                      help="train (or load) and cache the classifier, print its accuracy")
  parser.add_argument("--image_size", type=int, default=8, choices=digits.IMAGE_SIZES)
  parser.add_argument("--cache_dir", default=None,
                      help=f"default ${CACHE_ENV}, else {DEFAULT_CACHE_DIR}")
  parser.add_argument("--sanity", action="store_true",
                      help="print metrics of real test digits vs noise and blurred digits")
  args = parser.parse_args(argv)
  if not (args.train or args.sanity):
    parser.error("nothing to do: pass --train and/or --sanity")
  classifier = load_or_train_classifier(args.image_size, args.cache_dir, verbose=True)
  print(f"{classifier.name}: {classifier_path(args.image_size, cache_dir=args.cache_dir)}")
  print(json.dumps(classifier.metadata, indent=1, sort_keys=True))
  if args.sanity:
    print(f"{'vs digits/train':32s} {'fd':>9s} {'accuracy':>9s} {'entropy':>8s} {'conf':>6s}")
    for name, m in sanity_table(args.image_size, args.cache_dir).items():
      print(f"{name:32s} {m['fd']:9.3f} {m['accuracy']:9.3f} {m['label_entropy']:8.3f} "
            f"{m['confidence']:6.3f}")


if __name__ == "__main__":
  main()
