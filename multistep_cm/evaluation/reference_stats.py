"""Reference FID statistics (Inception pool3 mean and covariance) of a dataset split.

  python -m multistep_cm.evaluation.reference_stats --dataset=imagenet2012 \\
      --split=validation --image_size=64 --weights=inception_fid.npz --output=ref.npz

  python -m multistep_cm.evaluation.reference_stats --images_npz=images.npz \\
      --weights=inception_fid.npz --output=ref.npz

TFDS images are centre-cropped to a square and downsampled to `image_size`
with an antialiased (area) resize, then rounded to uint8, the form in which a
model at that resolution sees its data; the FID network then upsamples them
to 299x299 (`inception.preprocess`). An `--images_npz` file holds uint8
[N, H, W, C] under `images` (or `arr_0`, the ADM sample format), used as is.
Run the same command on every host of a multi-host job: each process reads
its share of the split and the statistics are reduced over all devices.
The output records the network, the weights' digest, the preprocessing, the
data and the sample count, so a FID computed against it can say all of that.
"""
import argparse
import math
import os
import shlex
import sys
from typing import Any, Iterator, Sequence

import jax
import numpy as np

from multistep_cm.evaluation import fid
from multistep_cm.evaluation import inception

RESIZE_METHODS = ("area", "bilinear", "bicubic", "lanczos3")


def center_crop_resize(image, image_size: int, method: str = "area"):
  """A tf uint8 [H, W, C] image -> uint8 [S, S, C]: central square, antialiased resize."""
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  shape = tf.shape(image)
  h, w = shape[0], shape[1]
  side = tf.minimum(h, w)
  image = tf.image.crop_to_bounding_box(image, (h - side) // 2, (w - side) // 2, side, side)
  image = tf.image.resize(tf.cast(image, tf.float32), (image_size, image_size), method=method,
                          antialias=True)
  return tf.cast(tf.clip_by_value(tf.round(image), 0, 255), tf.uint8)


def _not_prepared_message(dataset: str, data_dir: str | None) -> str:
  where = data_dir or "~/tensorflow_datasets"
  message = (f"TFDS dataset {dataset!r} is not prepared in {where}. Prepare it once with: "
             f"tfds build {dataset} --data_dir={where}")
  if dataset.split("/")[0].split(":")[0] == "imagenet2012":
    message += (". ImageNet cannot be downloaded automatically: first put "
                "ILSVRC2012_img_train.tar and ILSVRC2012_img_val.tar (from image-net.org) in "
                f"{os.path.join(where, 'downloads', 'manual')}/ (TFDS's manual_dir)")
  return message


def tfds_batches(dataset: str, split: str, image_size: int, batch_size: int,
                 data_dir: str | None = None, method: str = "area",
                 num_examples: int | None = None) -> tuple[Iterator[np.ndarray], int | None]:
  """This process's share of a TFDS split as uint8 batches, and the global step count.

  The step count is None where TFDS does not know the split's size (mock data),
  which only a single-process job can live with.
  """
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  tf.config.set_visible_devices([], "GPU")  # the accelerators belong to JAX
  if num_examples is not None:
    split = f"{split}[:{num_examples}]"
  process_split = tfds.split_for_jax_process(split, drop_remainder=False)
  try:
    ds, info = tfds.load(dataset, split=process_split, data_dir=data_dir, download=False,
                         with_info=True, shuffle_files=False)
  except (AssertionError, tfds.core.registered.DatasetNotFoundError) as e:
    raise FileNotFoundError(_not_prepared_message(dataset, data_dir)) from e
  num_batches = None
  try:
    # Every process must run the same number of steps: the one with the most examples decides.
    per_process = math.ceil(info.splits[split].num_examples / jax.process_count())
    num_batches = math.ceil(per_process / batch_size)
  except KeyError:
    pass
  ds = ds.map(lambda ex: center_crop_resize(ex["image"], image_size, method),
              num_parallel_calls=tf.data.AUTOTUNE)
  ds = ds.batch(batch_size).prefetch(2)
  return iter(tfds.as_numpy(ds)), num_batches


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


def compute_reference_stats(batches, num_batches: int | None, variables, *, batch_size: int,
                            resize: str = "tf1", metadata: dict[str, Any] | None = None,
                            progress: bool = True) -> fid.FeatureStats:
  """FID statistics of uint8 image batches with the given Inception variables."""
  meta = {
      "network": inception.NETWORK_NAME,
      "weights_sha256": inception.variables_digest(variables),
      "resize": resize,
      **(metadata or {}),
  }

  def apply_fn(variables, images):
    return inception.features_and_logits(variables, images, resize=resize)

  stats, _ = fid.compute_stats(apply_fn, variables, batches, batch_size=batch_size,
                               num_batches=num_batches, metadata=meta, progress=progress)
  return stats


def parse_args(argv: Sequence[str] | None):
  parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
  source = parser.add_mutually_exclusive_group(required=True)
  source.add_argument("--dataset", help="TFDS name, e.g. imagenet2012")
  source.add_argument("--images_npz", help=".npz with uint8 images [N, H, W, C]")
  parser.add_argument("--split", default="validation", help="TFDS split")
  parser.add_argument("--image_size", type=int, help="TFDS: crop and resize to this size")
  parser.add_argument("--data_dir", default=None, help="TFDS data_dir")
  parser.add_argument("--resize_method", default="area", choices=RESIZE_METHODS,
                      help="TFDS: downsampling filter (antialiased)")
  parser.add_argument("--num_examples", type=int, default=None,
                      help="only the first N examples (debugging; a FID needs them all)")
  parser.add_argument("--weights", required=True, help="converted FID Inception .npz")
  parser.add_argument("--resize", default="tf1", choices=inception.RESIZE_MODES,
                      help="how images reach 299x299: as the TF FID graph, or pytorch-fid")
  parser.add_argument("--batch_size", type=int, default=None,
                      help="images per process and step (default 32 per local device)")
  parser.add_argument("--output", required=True, help="statistics .npz to write")
  args = parser.parse_args(argv)
  if args.dataset and not args.image_size:
    parser.error("--dataset needs --image_size")
  return args


def main(argv: Sequence[str] | None = None) -> fid.FeatureStats:
  args = parse_args(argv)
  # Load the weights first: a missing file is the likeliest mistake and costs nothing to report.
  variables = inception.load_inception_params(args.weights)
  batch_size = args.batch_size or 32 * jax.local_device_count()
  command = "python -m multistep_cm.evaluation.reference_stats " + shlex.join(
      sys.argv[1:] if argv is None else list(argv))
  metadata = {"weights_file": os.path.basename(args.weights), "command": command}
  if args.dataset:
    batches, num_batches = tfds_batches(args.dataset, args.split, args.image_size, batch_size,
                                        args.data_dir, args.resize_method, args.num_examples)
    metadata.update(data=f"tfds:{args.dataset}/{args.split}", image_size=args.image_size,
                    preprocessing=f"center crop, {args.resize_method} resize (antialiased), "
                    "uint8")
  else:
    images = load_images_npz(args.images_npz)
    if args.num_examples is not None:
      images = images[:args.num_examples]
    batches, num_batches = npz_batches(images, batch_size)
    metadata.update(data=f"npz:{os.path.basename(args.images_npz)}",
                    image_size=int(images.shape[1]), preprocessing="as stored (uint8)")
  stats = compute_reference_stats(batches, num_batches, variables, batch_size=batch_size,
                                  resize=args.resize, metadata=metadata)
  if jax.process_index() == 0:
    stats.save(args.output)
    print(f"wrote {args.output}: {stats.count} images, {metadata['data']}")
  return stats


if __name__ == "__main__":
  main()
