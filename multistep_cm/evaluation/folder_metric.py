"""A metric for your own images that needs nothing downloaded: the Fréchet distance in the
features of a small CNN trained here on the dataset's own training split.

  python -m multistep_cm.evaluation.folder_metric --dataset=folder:NAME [--data_dir=D] --sanity
  python -m multistep_cm.evaluation.folder_metric --dataset=digits --sanity

The digits metric (digits_metric.py) generalised to any prepared image folder
(data/image_folder.py): a CNN of the data's size, channels and classes is trained on the
`train` split, deterministically (seed 0, on the CPU backend, a fixed number of steps:
seconds), and cached as `<cache>/folder_classifier_<hash>.npz` by a hash of its settings
and of the dataset's record (`image_folder.json`: files, splits, size), so preparing the
data again or changing a setting trains a new one. `fd` is the Fréchet distance between its
penultimate features (before the ReLU) of the samples and of the held-out split
(`validation`, prepare's `--holdout`); a class-conditional sample's `accuracy` is the
fraction the CNN puts in its class. An unlabelled folder has no classes to learn: its
features are those of the same CNN with its random initial weights (seed 0), not trained,
and every report says so ("untrained"). Like FID, `fd` is biased by the sample count:
compare at equal counts. `--dataset=digits` treats the embedded digits the same way (train
on its train split, held out: its test split). `--sanity` prints FD against the training
split of held-out real images, the same blurred, and noise.
"""
import argparse
import dataclasses
import functools
import hashlib
import json
import os
import time
from typing import Any, Mapping, Sequence

import jax
import numpy as np
import optax
import scipy.special

from multistep_cm.data import digits
from multistep_cm.data import image_folder
from multistep_cm.data.sources import DatasetError
from multistep_cm.evaluation import digits_metric
from multistep_cm.evaluation import fid
from multistep_cm.evaluation import tree_io

# Bump `version` when the architecture or the training changes meaning: it enters the hash.
DEFAULT_SETTINGS = {"version": 1, "width": 32, "feature_dim": 64, "train_steps": 1000,
                    "batch_size": 64, "learning_rate": 2e-3, "weight_decay": 1e-4, "seed": 0}
_CHUNK = 256  # rows per jitted call (padded), so one compilation serves every call


# The digits metric's network, with the folder's classes: conv pairs with 2x average pooling
# down to at most 4x4, a dense feature layer (the features, before their ReLU), the logits.
FolderCNN = digits_metric.DigitsCNN


@dataclasses.dataclass(frozen=True)
class ImageData:
  """A dataset's training and held-out images ([N, S, S, C] float32 in [-1, 1]) and labels
  (int32 [N]; None for an unlabelled dataset), and what identifies it."""
  name: str
  train: np.ndarray
  train_labels: np.ndarray | None
  held_out: np.ndarray
  held_out_labels: np.ndarray | None
  num_classes: int
  identity: str  # what the cache hash covers: the record, or the digits and size


def load_data(dataset: str, data_dir: str | None = None, image_size: int | None = None
              ) -> ImageData:
  """`folder:NAME` (its `train` and `validation` splits) or `digits` (train and test).

  Raises:
    ValueError: a dataset of neither kind, or a folder prepared without a held-out split
      (the message names the prepare flag).
    DatasetError: a folder that is not prepared (data/image_folder.py).
  """
  if dataset == "digits":
    size = image_size or 8
    x, y = digits.load_digits("train", size)
    xv, yv = digits.load_digits("test", size)
    return ImageData("digits", x, y, xv, yv, digits.NUM_CLASSES, f"digits {size}px")
  name = image_folder.folder_name(dataset)
  if name is None:
    raise ValueError(f"the folder metric takes 'folder:NAME' or 'digits', got {dataset!r}")
  record = image_folder.read_record(name, data_dir)
  if not record["splits"].get(image_folder.HOLDOUT_SPLIT):
    raise ValueError(f"folder:{name} has no held-out split '{image_folder.HOLDOUT_SPLIT}' to "
                     "measure against: prepare it again with --holdout=0.1 (or a count)")
  from multistep_cm.data import tfds_source  # pylint: disable=g-import-not-at-top
  arrays = {}
  for split in ("train", image_folder.HOLDOUT_SPLIT):
    source = tfds_source.TfdsSource(f"{image_folder.BUILDER}/{name}", split, data_dir,
                                    image_size)
    batch = source.get(np.arange(len(source)))
    labelled = record["num_classes"] > 0
    arrays[split] = (batch["image"].astype(np.float32),
                     batch["label"].astype(np.int32) if labelled else None)
  # The size the images were read at (None: the record's own), so that asking for the
  # prepared size by name hits the same cached classifier as not asking.
  size = image_size or int(record["image_size"])
  identity = json.dumps({"record": record, "image_size": size}, sort_keys=True)
  return ImageData(f"folder:{name}", *arrays["train"], *arrays[image_folder.HOLDOUT_SPLIT],
                   int(record["num_classes"]), identity)


@dataclasses.dataclass(frozen=True, eq=False)
class FolderClassifier:
  """A `FolderCNN` (trained, or at its initial weights for unlabelled data) and its ids."""
  params: Any
  settings: Mapping[str, Any]
  metadata: Mapping[str, Any]  # settings_hash, weights_sha256, trained, held_out_accuracy

  @property
  def trained(self) -> bool:
    return bool(self.metadata["trained"])

  @property
  def name(self) -> str:
    kind = "cnn" if self.trained else "untrained-cnn"
    return f"folder-{kind}-{self.settings['image_size']}px-{self.metadata['settings_hash']}"

  def logits_and_features(self, images) -> tuple[np.ndarray, np.ndarray]:
    """images [N, S, S, C] (clipped to [-1, 1], as saved images are) -> (logits, features)."""
    s, c = self.settings["image_size"], self.settings["channels"]
    images = np.asarray(images, np.float32)
    if images.ndim != 4 or images.shape[1:] != (s, s, c):
      raise ValueError(f"{self.name} takes images [N, {s}, {s}, {c}], got {images.shape}")
    images = np.clip(images, -1.0, 1.0)
    apply = _jitted_apply(_model(self.settings))
    logits, features = [], []
    for start in range(0, len(images), _CHUNK):
      chunk = images[start:start + _CHUNK]
      padded = np.zeros((_CHUNK,) + chunk.shape[1:], np.float32)
      padded[:len(chunk)] = chunk
      out = apply(self.params, padded)
      logits.append(np.asarray(out[0])[:len(chunk)])
      features.append(np.asarray(out[1])[:len(chunk)])
    return np.concatenate(logits), np.concatenate(features)


def _model(settings) -> FolderCNN:
  return FolderCNN(settings["width"], settings["feature_dim"], settings["num_classes"])


@functools.lru_cache(maxsize=None)
def _jitted_apply(model: FolderCNN):
  return jax.jit(model.apply)


def settings_for(data: ImageData, settings: Mapping[str, Any] | None = None) -> dict:
  """The classifier's settings: the defaults (or `settings`) and the data's shape, classes
  and identity's hash (so the cache follows the data)."""
  return dict(DEFAULT_SETTINGS if settings is None else settings,
              image_size=int(data.train.shape[1]), channels=int(data.train.shape[3]),
              num_classes=int(data.num_classes),
              data=hashlib.sha256(data.identity.encode()).hexdigest()[:16])


def train_classifier(data: ImageData, settings: Mapping[str, Any] | None = None
                     ) -> FolderClassifier:
  """The CNN trained on `data.train` (cross-entropy, AdamW, `train_steps` batches drawn with
  the seed); for unlabelled data, its initial weights. Deterministic; nothing cached."""
  settings = settings_for(data, settings)
  start = time.time()
  model = _model(settings)
  trained = data.num_classes > 0
  optimizer = optax.adamw(settings["learning_rate"], weight_decay=settings["weight_decay"])

  def loss_fn(params, x, y):
    logits, _ = model.apply(params, x)
    return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()

  @jax.jit  # one step per call: XLA:CPU runs convolutions inside lax.scan far slower
  def train_step(params, opt_state, x, y):
    grads = jax.grad(loss_fn)(params, x, y)
    updates, opt_state = optimizer.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state

  rng = np.random.default_rng(settings["seed"])
  batch = min(settings["batch_size"], len(data.train))
  with jax.default_device(digits_metric._cpu_device()):  # pylint: disable=protected-access
    params = model.init(jax.random.key(settings["seed"]), data.train[:1])
    if trained:
      opt_state = optimizer.init(params)
      for _ in range(settings["train_steps"]):
        idx = rng.choice(len(data.train), batch, replace=False)
        params, opt_state = train_step(params, opt_state, data.train[idx],
                                       data.train_labels[idx])
    params = jax.device_get(params)
  metadata = {"settings_hash": digits_metric.settings_hash(settings),
              "weights_sha256": tree_io.digest(params), "trained": trained,
              "dataset": data.name, "train_seconds": round(time.time() - start, 2)}
  classifier = FolderClassifier(params, settings, metadata)
  if trained:
    logits, _ = classifier.logits_and_features(data.held_out)
    metadata["held_out_accuracy"] = float(np.mean(logits.argmax(-1) == data.held_out_labels))
  return classifier


def classifier_path(settings: Mapping[str, Any], cache_dir: str | None = None) -> str:
  return os.path.join(digits_metric.cache_dir_path(cache_dir),
                      f"folder_classifier_{digits_metric.settings_hash(settings)}.npz")


def load_or_train_classifier(data: ImageData, cache_dir: str | None = None,
                             settings: Mapping[str, Any] | None = None,
                             verbose: bool = False) -> FolderClassifier:
  """The cached classifier of `data` (and `settings`), trained and cached first if absent."""
  return digits_metric.cached_classifier(
      classifier_path(settings_for(data, settings), cache_dir),
      lambda: train_classifier(data, settings), FolderClassifier,
      f"the folder classifier of {data.name}", verbose)


def feature_stats(classifier: FolderClassifier, images) -> fid.FeatureStats:
  stats = fid.FeatureStats(classifier.settings["feature_dim"])
  stats.add_features(classifier.logits_and_features(images)[1])
  return stats


def folder_metrics(images, labels, classifier: FolderClassifier,
                   reference: fid.FeatureStats) -> dict[str, Any]:
  """`fd` of samples [N, S, S, C] in [-1, 1] to `reference` (the held-out split's features),
  and, for a trained classifier and integer `labels`, `accuracy` and `label_entropy`."""
  logits, features = classifier.logits_and_features(images)
  samples = fid.FeatureStats(features.shape[1])
  samples.add_features(features)
  out = {"fd": fid.frechet_distance(*samples.mean_cov(), *reference.mean_cov()),
         "num_samples": int(len(features)), "reference_num_samples": reference.count}
  if classifier.trained:
    probs = scipy.special.softmax(logits.astype(np.float64), axis=-1)
    marginal = probs.mean(axis=0)
    out["label_entropy"] = float(-np.sum(marginal * np.log(np.clip(marginal, 1e-300, None))))
    labels = None if labels is None else np.asarray(labels)
    if labels is not None and labels.dtype.kind in "iu" and labels.shape == (len(features),):
      out["accuracy"] = float(np.mean(probs.argmax(-1) == labels))
  return out


def describe(classifier: FolderClassifier) -> str:
  """What a report says was measured."""
  weights = (f"trained on {classifier.metadata['dataset']}'s train split (held-out "
             f"accuracy {classifier.metadata['held_out_accuracy']:.3f})" if classifier.trained
             else "at its random initial weights (seed 0), untrained: the folder is unlabelled")
  return (f"{classifier.name} features, {weights}, weights sha256 "
          f"{classifier.metadata['weights_sha256'][:12]}; reference: the held-out split")


def blurred(images: np.ndarray) -> np.ndarray:
  """The 3x3 binomial blur ([1, 2, 1] / 4 along each axis, a Gaussian of sigma ~0.7 px) of
  every channel, edges repeated: a mild corruption even at 8 px, where a 3x3 box blur
  erases as much as noise does."""
  s = images.shape[1]
  padded = np.pad(images, ((0, 0), (1, 1), (1, 1), (0, 0)), mode="edge")
  w = (0.25, 0.5, 0.25)
  return sum(w[i] * w[j] * padded[:, i:i + s, j:j + s] for i in range(3) for j in range(3))


def sanity_table(data: ImageData, classifier: FolderClassifier) -> dict[str, dict[str, Any]]:
  """The metric of held-out images, blurred, and noise, against the training split."""
  reference = feature_stats(classifier, data.train)
  rng = np.random.default_rng(0)
  x = data.held_out
  cases = {"real held-out images": x, "binomial-blurred held-out images": blurred(x),
           "gaussian noise N(0,1)": rng.normal(size=x.shape).astype(np.float32),
           "uniform noise U(-1,1)": rng.uniform(-1, 1, size=x.shape).astype(np.float32)}
  return {name: folder_metrics(images, data.held_out_labels, classifier, reference)
          for name, images in cases.items()}


def main(argv: Sequence[str] | None = None):
  parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
  parser.add_argument("--dataset", required=True, help="folder:NAME, or digits")
  parser.add_argument("--data_dir", default=None, help="where folder:NAME was prepared")
  parser.add_argument("--image_size", type=int, default=None,
                      help="default: the dataset's own (digits: 8)")
  parser.add_argument("--cache_dir", default=None, help=f"default ${digits_metric.CACHE_ENV}"
                      f", else {digits_metric.DEFAULT_CACHE_DIR}")
  parser.add_argument("--sanity", action="store_true",
                      help="print FD of held-out images, blurred ones and noise")
  args = parser.parse_args(argv)
  try:
    data = load_data(args.dataset, args.data_dir, args.image_size)
  except (ValueError, DatasetError) as e:
    parser.exit(2, f"folder_metric: error: {' '.join(str(e).split())}\n")
  classifier = load_or_train_classifier(data, args.cache_dir, verbose=True)
  print(describe(classifier))
  print(json.dumps(dict(classifier.metadata), indent=1, sort_keys=True))
  if args.sanity:
    print(f"{'vs the training split':34s} {'fd':>10s} {'accuracy':>9s}")
    for name, m in sanity_table(data, classifier).items():
      accuracy = f"{m['accuracy']:9.3f}" if "accuracy" in m else f"{'-':>9s}"
      print(f"{name:34s} {m['fd']:10.3f} {accuracy}")


if __name__ == "__main__":
  main()
