"""Bytes and read rate of a text-image dataset's examples, embeddings stored float32 vs float16.

  python -m benchmarks.text_data --out benchmarks/results/text_data_DATE_TAG.json

Measured: `--num_examples` random JPEGs (`--image_size` square, quality 90) with random
embeddings [--text_len, --text_dim] (default T5-XXL's 128 x 4096) and ragged masks are
prepared with `prepare --text_images` once per stored dtype (data/text_image.py); then
`TfdsSource[i]` (array_record read, JPEG decode, embedding and mask to float32/int32) is
timed over every example, the dtypes alternated over `--rounds` rounds, medians reported.
`examples_per_cpu_s` is per second of process CPU time (robust to other load);
`bytes_per_example` is the array_record files' size over the example count.
"""
import argparse
import json
import os
import statistics
import sys
import tempfile
import time

import numpy as np
from PIL import Image

from benchmarks import common
from multistep_cm.data import text_image
from multistep_cm.data import tfds_source


def _inputs(folder: str, args) -> tuple[str, str]:
  """The manifest and the .npy folder of `args.num_examples` random examples."""
  rng = np.random.default_rng(0)
  n, size = args.num_examples, args.image_size
  with open(os.path.join(folder, "manifest.jsonl"), "w") as fh:
    for i in range(n):
      Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)).save(
          os.path.join(folder, f"{i}.jpg"), quality=90)
      fh.write(json.dumps({"image": f"{i}.jpg", "caption": f"caption {i}"}) + "\n")
  embeddings = os.path.join(folder, "embeddings")
  os.makedirs(embeddings)
  np.save(os.path.join(embeddings, "text_embedding.npy"),
          rng.standard_normal((n, args.text_len, args.text_dim)).astype(np.float32))
  tokens = rng.integers(1, args.text_len + 1, n)
  np.save(os.path.join(embeddings, "text_mask.npy"),
          (np.arange(args.text_len) < tokens[:, None]).astype(np.int32))
  return os.path.join(folder, "manifest.jsonl"), embeddings


def run(args) -> dict:
  dtypes = common.check_choices(argparse.ArgumentParser(), "dtypes", args.dtypes,
                                text_image.DTYPES)
  with tempfile.TemporaryDirectory(prefix="text_data_") as root:
    manifest, embeddings = _inputs(root, args)
    data_dir, sources, by_dtype = os.path.join(root, "tfds"), {}, {}
    for dtype in dtypes:
      wall, cpu = time.perf_counter(), time.process_time()
      path = text_image.build(manifest, embeddings, f"bench_{dtype}", data_dir, dtype,
                              progress=False)
      wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
      size = sum(os.path.getsize(os.path.join(path, f)) for f in os.listdir(path)
                 if ".array_record" in f)
      sources[dtype] = tfds_source.TfdsSource(
          f"{text_image.BUILDER}/bench_{dtype}", "train", data_dir, args.image_size,
          text_len=args.text_len, text_dim=args.text_dim)
      by_dtype[dtype] = {"bytes_per_example": size / args.num_examples,
                         "prepare_wall_seconds": wall, "prepare_cpu_seconds": cpu,
                         "examples_per_cpu_s_rounds": []}
    for warm_up in (True, False):  # one untimed pass warms the page cache and the readers
      for dtype in dtypes * (1 if warm_up else args.rounds):
        cpu = time.process_time()
        for i in range(args.num_examples):
          sources[dtype][i]  # pylint: disable=pointless-statement
        if not warm_up:
          rate = args.num_examples / (time.process_time() - cpu)
          by_dtype[dtype]["examples_per_cpu_s_rounds"].append(rate)
  for row in by_dtype.values():
    row["examples_per_cpu_s"] = statistics.median(row["examples_per_cpu_s_rounds"])
  return {"benchmark": "text_data", "date": common.today(), "machine": common.machine(),
          "command": " ".join(["python -m benchmarks.text_data"] + sys.argv[1:]),
          "num_examples": args.num_examples, "image_size": args.image_size,
          "text_len": args.text_len, "text_dim": args.text_dim, "rounds": args.rounds,
          "dtypes": by_dtype}


def parse_args(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--num_examples", type=int, default=200)
  parser.add_argument("--image_size", type=int, default=64)
  parser.add_argument("--text_len", type=int, default=128, help="L (T5-XXL setting: 128)")
  parser.add_argument("--text_dim", type=int, default=4096, help="D (T5-XXL: 4096)")
  parser.add_argument("--dtypes", default="float32,float16", help="stored dtypes to compare")
  parser.add_argument("--rounds", type=int, default=3)
  parser.add_argument("--out", default=None, help="also write the JSON here")
  return parser.parse_args(argv)


main = common.main_for(parse_args, run)


if __name__ == "__main__":
  main()
