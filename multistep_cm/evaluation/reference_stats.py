"""Reference statistics (feature mean and covariance) of a dataset split, for FID or FD-DINOv2.

  python -m multistep_cm.evaluation.reference_stats --dataset=imagenet2012 \\
      --split=validation --image_size=64 --weights=inception_fid.npz --output=ref.npz

  python -m multistep_cm.evaluation.reference_stats --images_npz=images.npz \\
      --features=dinov2 --weights=dinov2_vitl14.npz --keep_features --output=ref_dinov2.npz

`--features` picks the network: `inception` (FID's pool3, the default) or `dinov2` (the CLS
feature of FD-DINOv2, dinov2.py); `--weights` is that network's converted file.
`--keep_features` also stores every feature row, which precision/recall (prdc.py) need.

TFDS images go through the training pipeline's own preprocessing
(`data/tfds_source.py`: central square crop, antialiased bicubic resize to
`image_size`) and are rounded to uint8, exactly the images a model at that
resolution is trained on; the FID network then upsamples them to 299x299
(`inception.preprocess`), or DINOv2 resizes them to 224x224 as EDM2 does
(`dinov2.preprocess`). An `--images_npz` file holds uint8
[N, H, W, C] under `images` (or `arr_0`, the ADM sample format), used as is.
Run the same command on every host of a multi-host job: each process reads
its share of the split and the statistics are reduced over all devices.
The output records the network, the weights' digest, the preprocessing, the
data and the sample count, so a distance computed against it can say all of that,
and a distance to statistics of another network is refused.
"""
import argparse
import dataclasses
import functools
import math
import os
import shlex
import sys
from typing import Any, Callable, Iterator, Sequence

import jax
import numpy as np

from multistep_cm.evaluation import dinov2
from multistep_cm.evaluation import fid
from multistep_cm.evaluation import inception

FEATURES = ("inception", "dinov2")

def tfds_batches(dataset: str, split: str, image_size: int, batch_size: int,
                 data_dir: str | None = None,
                 num_examples: int | None = None) -> tuple[Iterator[np.ndarray], int]:
  """This process's share of a TFDS split as uint8 batches, and the global step count.

  Reads by index through the training pipeline's `TfdsSource`, so the preprocessing
  is the one the model trains on. Every process runs the same number of steps; the
  short ones yield empty batches at the end, which `compute_stats` masks.

  Raises:
    DatasetError: the dataset is not prepared; the message names the command.
  """
  from multistep_cm.data import tfds_source  # pylint: disable=g-import-not-at-top
  source = tfds_source.TfdsSource(dataset, split, data_dir, image_size)
  total = len(source) if num_examples is None else min(num_examples, len(source))
  per_process = math.ceil(total / jax.process_count())
  start = min(total, jax.process_index() * per_process)
  stop = min(total, start + per_process)
  num_batches = max(1, math.ceil(per_process / batch_size))

  def batches():
    for b in range(num_batches):
      lo, hi = min(stop, start + b * batch_size), min(stop, start + (b + 1) * batch_size)
      if hi <= lo:
        yield np.zeros((0, image_size, image_size, 3), np.uint8)
        continue
      images = source.get(np.arange(lo, hi))["image"]
      # The pipeline maps uint8 u to u / 127.5 - 1; this inverts it exactly.
      yield np.clip(np.round((images + 1.0) * 127.5), 0, 255).astype(np.uint8)

  return batches(), num_batches


def load_images_npz(path: str) -> np.ndarray:
  """uint8 [N, H, W, C] from an .npz's `images` (or `arr_0`) entry."""
  with np.load(path, allow_pickle=False) as data:
    key = next((k for k in ("images", "arr_0") if k in data.files), None)
    if key is None:
      raise ValueError(f"{path} has no 'images' (or 'arr_0') entry; has {data.files[:10]}")
    images = data[key]
  if images.dtype != np.uint8 or images.ndim != 4 or images.shape[-1] not in (1, 3):
    raise ValueError(f"{path}:{key} must be uint8 [N, H, W, 1 or 3], got {images.dtype} "
                     f"{images.shape}")
  return images


def npz_batches(images: np.ndarray, batch_size: int) -> tuple[Iterator[np.ndarray], int]:
  """This process's contiguous share of `images` in batches, and the global step count."""
  shares = np.array_split(np.arange(len(images)), jax.process_count())
  mine = shares[jax.process_index()]
  num_batches = math.ceil(max(len(s) for s in shares) / batch_size)
  batches = (images[mine[i:i + batch_size]] for i in range(0, len(mine), batch_size))
  return batches, num_batches


@dataclasses.dataclass(frozen=True)
class FeatureNetwork:
  """A feature network, its variables, and the records every statistics file of it carries
  (`network`, `weights_sha256`, `resize`: fid.FEATURE_KEYS; and `features`, its kind)."""
  kind: str
  apply_fn: Callable[..., dict[str, Any]]  # (variables, images) -> {"features", ["logits"]}
  variables: Any
  records: dict[str, Any]

  def stats(self, batches, num_batches: int | None, *, batch_size: int,
            metadata: dict[str, Any] | None = None, progress: bool = True,
            keep_logits: bool = False, keep_features: bool = False):
    """`fid.compute_stats` of uint8 image batches; `(stats, logits or None)`."""
    if keep_logits and self.kind != "inception":
      raise ValueError(f"{self.kind} has no class logits (the Inception Score needs them)")
    return fid.compute_stats(self.apply_fn, self.variables, batches, batch_size=batch_size,
                             num_batches=num_batches, metadata={**self.records,
                                                                **(metadata or {})},
                             progress=progress, keep_logits=keep_logits,
                             keep_features=keep_features)


def inception_network(variables, resize: str = "tf1") -> FeatureNetwork:
  return FeatureNetwork("inception", functools.partial(inception.features_and_logits,
                                                       resize=resize), variables,
                        {"network": inception.NETWORK_NAME, "features": "inception",
                         "weights_sha256": inception.variables_digest(variables),
                         "resize": resize})


def dinov2_network(config: dinov2.Dinov2Config, variables) -> FeatureNetwork:
  return FeatureNetwork("dinov2", functools.partial(dinov2.features, config), variables,
                        {"network": dinov2.network_name(config), "features": "dinov2",
                         "weights_sha256": dinov2.variables_digest(variables),
                         "resize": "edm2_torch", "feature_preprocessing": dinov2.PREPROCESSING})


def load_network(kind: str, weights: str, resize: str = "tf1") -> FeatureNetwork:
  """The `kind` network ("inception" or "dinov2") from its converted weights file.

  Raises:
    FileNotFoundError: no such file (the message names the conversion command).
    ValueError: an unknown kind, or a file of another network.
  """
  if kind == "inception":
    return inception_network(inception.load_inception_params(weights), resize)
  if kind == "dinov2":
    return dinov2_network(*dinov2.load_dinov2(weights))
  raise ValueError(f"features must be one of {FEATURES}, got {kind!r}")


def features_kind(stats: fid.FeatureStats) -> str:
  """Which network a statistics file's features are of (files from before DINOv2 were all
  Inception's)."""
  return stats.metadata.get("features", "inception")


def parse_args(argv: Sequence[str] | None):
  parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
  source = parser.add_mutually_exclusive_group(required=True)
  source.add_argument("--dataset", help="TFDS name, e.g. imagenet2012")
  source.add_argument("--images_npz", help=".npz with uint8 images [N, H, W, C]")
  parser.add_argument("--split", default="validation", help="TFDS split")
  parser.add_argument("--image_size", type=int, help="TFDS: crop and resize to this size")
  parser.add_argument("--data_dir", default=None, help="TFDS data_dir")
  parser.add_argument("--num_examples", type=int, default=None,
                      help="only the first N examples (debugging; a FID needs them all)")
  parser.add_argument("--features", default="inception", choices=FEATURES,
                      help="the feature network: FID's Inception, or DINOv2 (FD-DINOv2)")
  parser.add_argument("--weights", required=True,
                      help="that network's converted .npz (convert_inception, convert_dinov2)")
  parser.add_argument("--resize", default=None, choices=inception.RESIZE_MODES,
                      help="Inception: how images reach 299x299, as the TF FID graph (tf1, "
                      "the default) or pytorch-fid")
  parser.add_argument("--keep_features", action="store_true",
                      help="also store every feature row (precision/recall need them)")
  parser.add_argument("--batch_size", type=int, default=None,
                      help="images per process and step (default 32 per local device)")
  parser.add_argument("--output", required=True, help="statistics .npz to write")
  args = parser.parse_args(argv)
  if args.dataset and not args.image_size:
    parser.error("--dataset needs --image_size")
  if args.features != "inception" and args.resize:
    parser.error(f"--resize is the Inception's; {args.features} resizes its own way")
  return args


def main(argv: Sequence[str] | None = None) -> fid.FeatureStats:
  args = parse_args(argv)
  # Load the weights first: a missing file is the likeliest mistake and costs nothing to report.
  network = load_network(args.features, args.weights, args.resize or "tf1")
  batch_size = args.batch_size or 32 * jax.local_device_count()
  command = "python -m multistep_cm.evaluation.reference_stats " + shlex.join(
      sys.argv[1:] if argv is None else list(argv))
  metadata = {"weights_file": os.path.basename(args.weights), "command": command}
  if args.dataset:
    batches, num_batches = tfds_batches(args.dataset, args.split, args.image_size, batch_size,
                                        args.data_dir, args.num_examples)
    metadata.update(data=f"tfds:{args.dataset}/{args.split}", image_size=args.image_size,
                    preprocessing="training pipeline: center crop, bicubic antialiased "
                    "resize (data/tfds_source.py), uint8")
  else:
    images = load_images_npz(args.images_npz)
    if args.num_examples is not None:
      images = images[:args.num_examples]
    batches, num_batches = npz_batches(images, batch_size)
    metadata.update(data=f"npz:{os.path.basename(args.images_npz)}",
                    image_size=int(images.shape[1]), preprocessing="as stored (uint8)")
  stats, _ = network.stats(batches, num_batches, batch_size=batch_size, metadata=metadata,
                           keep_features=args.keep_features)
  if jax.process_index() == 0:
    stats.save(args.output)
    print(f"wrote {args.output}: {stats.count} images, {metadata['data']}, "
          f"{network.records['network']}")
  return stats


if __name__ == "__main__":
  main()
