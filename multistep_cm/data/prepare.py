"""Prepares a TFDS dataset in the array_record format the input pipeline reads by index.

  python -m multistep_cm.data.prepare --dataset=imagenet2012 \
      --data_dir=/data/tfds --manual_dir=/data/imagenet_tars

ImageNet 2012 cannot be downloaded by TFDS: put ILSVRC2012_img_train.tar and
ILSVRC2012_img_val.tar (from https://image-net.org/download-images) into
`--manual_dir` first. The downsampled variants (`imagenet_resized/64x64`,
`downsampled_imagenet/64x64`) are downloaded by TFDS itself.

A text-image dataset is made from the user's own files (data/text_image.py describes them):

  python -m multistep_cm.data.prepare --text_images=captions.jsonl \
      --embeddings=t5_embeddings.npz --name=my_captions --data_dir=/data/tfds

writes `text_images/my_captions`, which a config reads as
`data.dataset = 'tfds:text_images/my_captions'` with `data.text_len`, `data.text_dim`
set to the embeddings' L and D.

A folder or zip of the user's own images (data/image_folder.py describes the layouts):

  python -m multistep_cm.data.prepare --images=my_images/ --name=shapes \
      --data_dir=/data/tfds --image_size=32 --holdout=0.1

writes `image_folders/shapes`, which a config reads as `data.dataset = 'folder:shapes'`
with `data.image_size`, `data.num_channels` and `data.num_classes` as the command prints
(a config that disagrees is refused).

The latents of a prepared image dataset, for latent diffusion (data/latents.py describes them):

  python -m multistep_cm.data.prepare --latents=folder:shapes --vae=sd_vae_ft_ema.safetensors \
      --name=shapes_sd --data_dir=/data/tfds [--image_size=256] [--batch_size=32]

encodes the dataset's training split once with a VAE converted by `python -m
multistep_cm.convert --from=sd-vae` and writes `latents/shapes_sd`, which a config reads as
`data.dataset = 'latent:shapes_sd'` with `data.image_size` and `data.num_channels` the latent's
(the command prints them); its samples are decoded by the same VAE for grids and metrics.

Exit codes: 0 written; 2 a bad command line or input (one `error:` line; nothing written:
for `--dataset`, a name or config TFDS does not have, or a dataset that needs files
downloaded by hand and a `--manual_dir` without them, found before any download); 3 a
download that failed; 6 a `--data_dir` that cannot be written; 130 interrupted by Ctrl-C
(nothing written).

This calls the TFDS builder API directly, which is what
`tfds build NAME --data_dir=... --manual_dir=... --file_format=array_record`
does; that CLI in tensorflow-datasets 4.9.10 also needs apache-beam installed.
"""
import argparse
import os
import re
import sys

import tensorflow_datasets as tfds

from multistep_cm.data import image_folder
from multistep_cm.data import latents
from multistep_cm.data.sources import DatasetError
from multistep_cm.data import tfds_source
# Imported for its side effect: it registers the `synthetic_jpeg` builder with TFDS.
from multistep_cm.data import synthetic  # pylint: disable=unused-import
from multistep_cm.data import text_image
from multistep_cm.sampling import inputs


class PrepareError(ValueError):
  """A `--dataset` that cannot be prepared: one line, and the exit `code` (2 a name or
  manual folder that is wrong, 3 a download that failed, 6 a data_dir that cannot be
  written)."""

  def __init__(self, message: str, code: int = 2):
    super().__init__(message)
    self.code = code


def _builder(dataset: str, data_dir: str | None):
  """TFDS's builder of `dataset`; PrepareError for a name or config TFDS does not have."""
  try:
    return tfds.builder(dataset, data_dir=data_dir, file_format="array_record")
  except tfds.core.registered.DatasetNotFoundError as e:
    close = re.search(r"Did you mean: \S+ -> (\S+) \?", str(e))
    raise PrepareError(f"--dataset={dataset}: TFDS has no such dataset"
                       + (f" (did you mean {close.group(1)}?)" if close else "")) from None
  except ValueError as e:  # a config the builder does not have
    name = dataset.partition("/")[0]
    configs = [c.name for c in getattr(tfds.builder_cls(name), "BUILDER_CONFIGS", [])]
    raise PrepareError(f"--dataset={dataset}: {name} has no such config; its configs: "
                       f"{configs}" if configs else f"--dataset={dataset}: {name} has no "
                       f"configs (name it without '/...')") from None


def prepare(dataset: str, data_dir: str | None = None, manual_dir: str | None = None) -> str:
  """Downloads (where TFDS can) and writes `dataset` as array_record; returns its path.

  Raises:
    PrepareError: a name, manual folder or data_dir that cannot be used, checked before
      anything is downloaded, or a download that failed.
  """
  tfds_source.ensure_tfds_can_prepare()
  where = os.path.expanduser(data_dir or os.environ.get("TFDS_DATA_DIR")
                             or "~/tensorflow_datasets")
  builder = _builder(dataset, data_dir)
  try:
    inputs.check_writable(where, "--data_dir")
  except inputs.InputError as e:
    raise PrepareError(str(e), code=e.code) from None
  prepared = (builder.data_path / "dataset_info.json").exists()  # quieter than is_prepared
  if builder.MANUAL_DOWNLOAD_INSTRUCTIONS and not prepared:
    folder = manual_dir or os.path.join(where, "downloads", "manual")
    if not os.path.isdir(folder) or not os.listdir(folder):
      needs = " ".join(builder.MANUAL_DOWNLOAD_INSTRUCTIONS.split())
      raise PrepareError(f"--manual_dir={folder}: {dataset} needs files downloaded by hand "
                         f"there, and it is missing or empty ({needs})")
  config = tfds.download.DownloadConfig(manual_dir=manual_dir)
  try:
    builder.download_and_prepare(download_config=config)
  except (OSError, tfds.download.DownloadError) as e:  # the network, or a full disk
    raise PrepareError(f"--dataset={dataset}: preparing it failed "
                       f"({(str(e).splitlines() or [type(e).__name__])[0]})", code=3) from None
  return str(builder.data_path)


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(prog="prepare", description=__doc__.split("\n", 1)[0])
  parser.error = lambda message: inputs.fail(None, inputs.BAD_FLAG, message)  # one line
  parser.add_argument("--dataset", default=None,
                      help="TFDS name with config, e.g. imagenet2012 or imagenet_resized/64x64")
  parser.add_argument("--data_dir", default=None,
                      help="TFDS data directory (default: $TFDS_DATA_DIR or ~/tensorflow_datasets)")
  parser.add_argument("--manual_dir", default=None,
                      help="folder holding manually downloaded archives (ImageNet's .tar files)")
  text = parser.add_argument_group("text-image data (instead of --dataset)")
  text.add_argument("--text_images", default=None,
                    help="JSON-lines manifest of {image, caption}, or a folder of images with "
                    "same-named .txt captions")
  text.add_argument("--embeddings", default=None,
                    help=".npz with text_embedding [N, L, D] and text_mask [N, L] (or a folder "
                    "with text_embedding.npy and text_mask.npy), row i for example i")
  text.add_argument("--name", default=None,
                    help="the dataset is text_images/NAME, or image_folders/NAME (folder:NAME)")
  text.add_argument("--embedding_dtype", default="float32", choices=text_image.DTYPES,
                    help="stored embedding dtype (float16 halves the bytes)")
  text.add_argument("--channels", default=None, type=int, choices=(1, 3),
                    help="image channels the dataset declares (3: RGB, 1: grey; text images: "
                    "3 unless given; --images: 1 if every image is grey, else 3)")
  own = parser.add_argument_group("your own images (instead of --dataset; with --name)")
  own.add_argument("--images", default=None,
                   help="a folder of images (flat, or one subfolder per class), or an EDM "
                   "dataset_tool folder or .zip with dataset.json")
  own.add_argument("--image_size", default=None, type=int,
                   help="resize every image to N x N (default: the images' own size)")
  own.add_argument("--crop", default="center", choices=image_folder.CROPS,
                   help="center: the central square; none: images must be square")
  own.add_argument("--holdout", default=None,
                   help="held out as the 'validation' split: a fraction (0.1) or a count (500)")
  own.add_argument("--skip_bad", action="store_true",
                   help="leave out unreadable or truncated images (counted) instead of stopping")
  latent = parser.add_argument_group("VAE latents of a prepared dataset (instead of --dataset; "
                                      "with --name and --vae)")
  latent.add_argument("--latents", default=None,
                      help="the image dataset as a config names it: folder:NAME, tfds:NAME, "
                      "an ImageNet name, or digits (for a VAE of data.train_vae)")
  latent.add_argument("--vae", default=None,
                      help="the VAE `convert --from=sd-vae` wrote (.safetensors or .npz, its "
                      "settings .json beside it)")
  latent.add_argument("--batch_size", default=32, type=int, help="images encoded at a time")
  args = parser.parse_args(argv)
  given = [f for f, v in (("--dataset", args.dataset), ("--text_images", args.text_images),
                          ("--images", args.images), ("--latents", args.latents))
           if v is not None]
  if len(given) != 1:
    parser.error("give one of --dataset, --text_images (with --embeddings and --name), "
                 "--images (with --name) or --latents (with --vae and --name)")
  if args.latents is not None:
    return _latents(parser, args)
  if args.dataset is not None:
    try:
      print(prepare(args.dataset, args.data_dir, args.manual_dir))
    except PrepareError as e:
      print(f"error: {e}", file=sys.stderr)
      return e.code
    return 0
  if args.images is not None:
    if args.name is None:
      parser.error("--images needs --name")
    if (code := _unwritable_data_dir(args)) is not None:
      return code
    try:
      path, record = image_folder.build(args.images, args.name, args.data_dir,
                                        args.image_size, args.crop, args.holdout,
                                        args.skip_bad, args.channels)
    except image_folder.InputError as e:
      print(f"error: {e}", file=sys.stderr)
      return 2
    except KeyboardInterrupt:
      print(f"error: interrupted; nothing of {image_folder.BUILDER}/{args.name} was written",
            file=sys.stderr)
      return 130
    print(image_folder.describe(record), file=sys.stderr)
    print(f"train with --config.data.dataset=folder:{args.name} --config.data.image_size="
          f"{record['image_size']} --config.data.num_channels={record['channels']} "
          f"--config.data.num_classes={record['num_classes']}"
          + (f" --config.data.data_dir={args.data_dir}" if args.data_dir else ""),
          file=sys.stderr)
    print(f"or, a teacher and a 4-step student in one job: --config=configs/folder_pipeline.py:"
          f"name={args.name}" + (f",data_dir={args.data_dir}" if args.data_dir else "")
          + " (docs/own_images.md)", file=sys.stderr)
    print(path)
    return 0
  if args.embeddings is None or args.name is None:
    parser.error("--text_images needs --embeddings and --name")
  if (code := _unwritable_data_dir(args)) is not None:
    return code
  try:
    path = text_image.build(args.text_images, args.embeddings, args.name, args.data_dir,
                            args.embedding_dtype, args.channels or 3)
  except text_image.InputError as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  print(path)
  return 0


def _unwritable_data_dir(args) -> int | None:
  """Exit 6 with one line unless a file can be made in the data_dir the dataset goes to:
  found before any image is read, not after all of them are."""
  try:
    inputs.check_writable(image_folder.data_dir_or_default(args.data_dir), "--data_dir")
  except inputs.InputError as e:
    print(f"error: {e}", file=sys.stderr)
    return e.code
  return None


def _latents(parser, args) -> int:
  if args.name is None or args.vae is None:
    parser.error("--latents needs --vae and --name")
  if (code := _unwritable_data_dir(args)) is not None:
    return code
  try:
    path, record = latents.build(args.latents, args.vae, args.name, args.data_dir,
                                 args.image_size, args.batch_size)
  except (latents.InputError, DatasetError) as e:
    print(f"error: {' '.join(str(e).split())}", file=sys.stderr)
    return 2
  except KeyboardInterrupt:
    print(f"error: interrupted; nothing of {latents.BUILDER}/{args.name} was written",
          file=sys.stderr)
    return 130
  print(f"{latents.BUILDER}/{args.name}: {record['splits']['train']} images of "
        f"{args.latents} ({record['image_size']}x{record['image_size']}) as "
        f"{record['latent_size']}x{record['latent_size']}x{record['latent_channels']} latents "
        f"by {record['vae']}", file=sys.stderr)
  print(f"train with --config.data.dataset={record['dataset']} --config.data.image_size="
        f"{record['latent_size']} --config.data.num_channels={record['latent_channels']} "
        f"--config.data.num_classes={record['num_classes']} --config.data.random_flip=False"
        + (f" --config.data.data_dir={args.data_dir}" if args.data_dir else ""), file=sys.stderr)
  print(path)
  return 0


if __name__ == "__main__":
  sys.exit(main())
