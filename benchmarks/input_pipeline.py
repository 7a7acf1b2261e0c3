"""Images/s per host core of the ImageNet 64 and 128 input pipelines, against what the step eats.

  python -m benchmarks.input_pipeline --out benchmarks/results/input_pipeline_DATE_TAG.json
  python -m benchmarks.input_pipeline --workers=threads,processes --rounds=3 ...

Measured: a synthetic ImageNet-shaped dataset (JPEG quality 90, widths and heights
uniform in [333, 500] like ImageNet's typical 500x375 photos) is written as
array_record, then `Pipeline.iterate` (Grain: TFDS read, decode, centre crop, resize,
flip) is timed for each image size, with exact and with `fast_decode` JPEG
decoding, and for each kind of decode worker in `--workers` (Grain's threads or
worker processes), the variants alternated over `--rounds` rounds, medians reported.
`images_per_cpu_s` (images per second of CPU time, the worker processes' included)
is the per-core rate; it stays meaningful on a machine shared with other jobs.
`measured` holds the first kind listed; `measured_by_workers` every kind.

Derived, with the assumptions in the report: what one chip's train step consumes,
(a) at the paper's measured speed (§7.3: steps/s of the small models on 64 TPU v5e
chips at batch 2048), and (b) at 100% MFU, the most any step of that FLOP count
can eat: peak FLOP/s / FLOPs per image, the FLOPs being the model FLOPs of the real
ImageNet configs' train steps, counted on their jaxprs as the trainer's logged MFU
counts them (`train_step --compile_only`; the diffusion step is the cheapest per
image, so it eats fastest). Dividing by the host cores per chip
gives the images/s per core the pipeline must deliver; `margin` is the measured
per-core rate over that (target >= 3).
"""
import argparse
import statistics
import sys
import tempfile
from typing import Any

from benchmarks import common
from benchmarks import train_step
from multistep_cm.data import pipeline
from multistep_cm.data import synthetic
from multistep_cm.data import tfds_source
from multistep_cm.runtime import hardware

TARGET = 3.0
# §7.3 (paper App. A.2): steps/s on 64 TPU v5e chips, batch 2048, small models.
PAPER_STEPS_PER_S = {64: {"ct": 2.7, "cd": 2.5}, 128: {"ct": 2.2, "cd": 1.7}}
PAPER_CHIPS, PAPER_BATCH = 64, 2048
# Physical host cores per accelerator chip (hyperthreads not counted).
# TPU v5e: a ct5lp-hightpu-8t VM has 224 vCPUs for 8 chips (the 4-chip VM 112 for 4).
# H200: an HGX H200 node pairs 8 GPUs with two host CPUs; 96 cores (2 x 48) assumed.
CORES_PER_CHIP = {"TPU v5e": 224 / 2 / 8, "NVIDIA H200": 96 / 8}
CONFIGS = {64: "configs/imagenet64_cd.py", 128: "configs/imagenet128_cd.py"}


def measure(data_dir: str | None, sizes: list[int], args) -> dict[str, Any]:
  """Per kind of decode worker, size and decode mode: the pipeline's rates (round medians)."""
  data_dir = data_dir or tempfile.mkdtemp(prefix="synthetic_tfds_")
  builder = synthetic.SyntheticJpeg(data_dir=data_dir)
  if not builder.is_prepared():
    synthetic.build(data_dir, num_examples=args.num_examples, size_range=(333, 500))
  runs = {}
  for _ in range(args.rounds):  # variants alternated, so drift on a shared machine hits all
    for workers in args.workers.split(","):
      for size in sizes:
        for fast_decode in (False, True):
          source = tfds_source.TfdsSource(synthetic.NAME, "train", data_dir, size, fast_decode)
          with pipeline.Pipeline(source, args.batch_size, seed=0, process_index=0,
                                 process_count=1, random_flip=True,
                                 num_threads=args.num_threads, workers=workers) as data:
            rates = pipeline.measure_throughput(data, args.num_steps)
          mode = "fast_decode" if fast_decode else "exact"
          runs.setdefault(workers, {}).setdefault(str(size), {}).setdefault(mode, []).append(rates)
  return {workers: {size: {mode: {k: statistics.median(r[k] for r in rounds) for k in rounds[0]}
                           for mode, rounds in by_mode.items()}
                    for size, by_mode in by_size.items()}
          for workers, by_size in runs.items()}


def step_flops_per_image(size: int, modes: str, preset: str | None) -> dict[str, float]:
  """Model FLOPs per image of each mode's train step of the size's ImageNet config."""
  argv = ["--config", CONFIGS[size], "--batch", "8", "--modes", modes, "--compile_only"]
  report = train_step.run(train_step.parse_args(argv + (["--preset", preset] if preset else [])))
  return {mode: r["flops_per_step"] / report["batch"] for mode, r in report["modes"].items()}


def consumption(flops: dict[int, dict[str, float]], rates) -> list[dict[str, Any]]:
  """What one chip's step consumes, per chip and per host core, and the pipeline's margin.

  `margin` is the measured per-core rate (exact decoding) over the per-core need.
  """
  rows = []
  for size, by_mode in flops.items():
    for mode, steps_per_s in PAPER_STEPS_PER_S[size].items():
      row = {"basis": "paper", "device": "TPU v5e", "size": size, "mode": mode,
             "steps_per_s": steps_per_s,
             "images_per_s_per_chip": steps_per_s * PAPER_BATCH / PAPER_CHIPS}
      if mode in by_mode:  # the MFU the paper's own speed implies, for scale
        row["implied_mfu"] = (steps_per_s * PAPER_BATCH * by_mode[mode]
                              / (PAPER_CHIPS * hardware.chip_spec("tpu v5e")[1]))
      rows.append(row)
    for device in CORES_PER_CHIP:
      for mode, per_image in by_mode.items():
        rows.append({"basis": "100% MFU", "device": device, "size": size, "mode": mode,
                     "images_per_s_per_chip": hardware.chip_spec(device)[1] / per_image})
  for row in rows:
    row["images_per_s_per_core"] = row["images_per_s_per_chip"] / CORES_PER_CHIP[row["device"]]
    row["margin"] = (rates[str(row["size"])]["exact"]["images_per_cpu_s"]
                     / row["images_per_s_per_core"])
    row["within_target"] = row["margin"] >= TARGET
  return rows


def run(args) -> dict[str, Any]:
  sizes = [int(s) for s in args.sizes.split(",")]
  by_workers = measure(args.data_dir, sizes, args)
  rates = by_workers[args.workers.split(",")[0]]
  report = {"benchmark": "input_pipeline", "date": common.today(), "machine": common.machine(),
            "command": " ".join(["python -m benchmarks.input_pipeline"] + sys.argv[1:]),
            "batch_size": args.batch_size, "num_steps": args.num_steps, "rounds": args.rounds,
            "measured": rates, "measured_by_workers": by_workers}
  if args.flops_modes:
    flops = {s: step_flops_per_image(s, args.flops_modes, args.flops_preset) for s in sizes}
    report.update(
        step_flops_per_image={str(s): v for s, v in flops.items()},
        assumptions={"paper": "§7.3 steps/s, 64 TPU v5e chips, batch 2048",
                     "host_cores_per_chip": CORES_PER_CHIP,
                     "peak_bound": "100% MFU at the listed bf16 peak (runtime/hardware.py)",
                     "per_core_rate": "images per second of process CPU time, exact decoding"},
        target=TARGET, consumption=consumption(flops, rates))
  return report


def parse_args(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
  parser.add_argument("--data_dir", default=None, help="reuse/write the dataset here")
  parser.add_argument("--num_examples", type=int, default=512)
  parser.add_argument("--batch_size", type=int, default=64)
  parser.add_argument("--num_steps", type=int, default=16)
  parser.add_argument("--num_threads", type=int, default=None,
                      help="decode threads or worker processes; default: all cores")
  parser.add_argument("--workers", default="threads",
                      help="comma-separated kinds of decode worker: threads, processes")
  parser.add_argument("--rounds", type=int, default=1, help="alternations of the variants")
  parser.add_argument("--sizes", default="64,128")
  parser.add_argument("--flops_modes", default="diffusion,ct,cd",
                      help="train-step modes compiled for FLOPs per image ('' skips)")
  parser.add_argument("--flops_preset", default=None,
                      help="model preset override for the FLOPs (tests use a tiny one)")
  parser.add_argument("--out", default=None, help="also write the JSON here")
  return parser.parse_args(argv)


main = common.main_for(parse_args, run)


if __name__ == "__main__":
  main()
