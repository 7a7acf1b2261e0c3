"""Images/s per host core of the ImageNet 64 and 128 input pipelines.

  python -m benchmarks.input_pipeline [--num_threads=N] [--num_steps=S] [--data_dir=DIR]

Writes a synthetic ImageNet-shaped dataset (JPEG quality 90, widths and heights
uniform in [333, 500] like ImageNet's typical 500x375 photos) as array_record,
then times `Pipeline.iterate` (TFDS read, decode, centre crop, resize, flip) for
each image size, with exact and with `fast_decode` JPEG decoding.
`images_per_cpu_s` (images per second of process CPU time) is the per-core rate
and stays meaningful on a machine shared with other jobs; compare it with the
images/s one host's share of the train step consumes.
"""
import argparse
import datetime
import platform
import tempfile

from multistep_cm.data import pipeline
from multistep_cm.data import synthetic


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
  parser.add_argument("--data_dir", default=None, help="reuse/write the dataset here")
  parser.add_argument("--num_examples", type=int, default=512)
  parser.add_argument("--batch_size", type=int, default=64)
  parser.add_argument("--num_steps", type=int, default=8)
  parser.add_argument("--num_threads", type=int, default=None, help="default: all cores")
  parser.add_argument("--sizes", default="64,128")
  args = parser.parse_args(argv)

  data_dir = args.data_dir or tempfile.mkdtemp(prefix="synthetic_tfds_")
  builder = synthetic.SyntheticJpeg(data_dir=data_dir)
  if not builder.is_prepared():
    synthetic.build(data_dir, num_examples=args.num_examples, size_range=(333, 500))
  print(f"# {datetime.date.today()}  {platform.processor() or platform.machine()}  "
        f"python {platform.python_version()}  data_dir={data_dir}")
  print("size  fast_decode  threads  images/s  images/s/core  images/cpu-s")
  for size in (int(s) for s in args.sizes.split(",")):
    for fast_decode in (False, True):
      source = pipeline.TfdsSource(synthetic.NAME, "train", data_dir, size, fast_decode)
      with pipeline.Pipeline(source, args.batch_size, seed=0, process_index=0, process_count=1,
                             random_flip=True, num_threads=args.num_threads) as data:
        rates = pipeline.measure_throughput(data, args.num_steps)
      print(f"{size:4d}  {str(fast_decode):>11}  {rates['cores']:7.0f}  "
            f"{rates['images_per_s']:8.0f}  {rates['images_per_s_per_core']:13.0f}  "
            f"{rates['images_per_cpu_s']:12.0f}")


if __name__ == "__main__":
  main()
