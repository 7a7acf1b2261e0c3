"""Prepares a TFDS dataset in the array_record format the input pipeline reads by index.

  python -m multistep_cm.data.prepare --dataset=imagenet2012 \
      --data_dir=/data/tfds --manual_dir=/data/imagenet_tars

ImageNet 2012 cannot be downloaded by TFDS: put ILSVRC2012_img_train.tar and
ILSVRC2012_img_val.tar (from https://image-net.org/download-images) into
`--manual_dir` first. The downsampled variants (`imagenet_resized/64x64`,
`downsampled_imagenet/64x64`) are downloaded by TFDS itself.

This calls the TFDS builder API directly, which is what
`tfds build NAME --data_dir=... --manual_dir=... --file_format=array_record`
does; that CLI in tensorflow-datasets 4.9.10 also needs apache-beam installed.
"""
import argparse
import sys

import tensorflow_datasets as tfds

from multistep_cm.data import tfds_source
# Imported for its side effect: it registers the `synthetic_jpeg` builder with TFDS.
from multistep_cm.data import synthetic  # pylint: disable=unused-import


def prepare(dataset: str, data_dir: str | None = None, manual_dir: str | None = None) -> str:
  """Downloads (where TFDS can) and writes `dataset` as array_record; returns its path."""
  tfds_source.ensure_tfds_can_prepare()
  builder = tfds.builder(dataset, data_dir=data_dir, file_format="array_record")
  config = tfds.download.DownloadConfig(manual_dir=manual_dir)
  builder.download_and_prepare(download_config=config)
  return str(builder.data_path)


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
  parser.add_argument("--dataset", required=True,
                      help="TFDS name with config, e.g. imagenet2012 or imagenet_resized/64x64")
  parser.add_argument("--data_dir", default=None,
                      help="TFDS data directory (default: $TFDS_DATA_DIR or ~/tensorflow_datasets)")
  parser.add_argument("--manual_dir", default=None,
                      help="folder holding manually downloaded archives (ImageNet's .tar files)")
  args = parser.parse_args(argv)
  print(prepare(args.dataset, args.data_dir, args.manual_dir))
  return 0


if __name__ == "__main__":
  sys.exit(main())
