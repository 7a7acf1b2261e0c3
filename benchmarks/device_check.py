"""The prepared accelerator check: ImageNet64-small train steps and sampling on one GPU.

    python -m benchmarks.device_check --out=/tmp/out [--budget_s=420] [--dry-run]
    benchmarks/device_check.sh --dry-run        # the same, through the shell wrapper

One command, no network, sized for the 15 minutes of device time a session may get:
  1. the chip's bf16 matmul rate, measured now (the MFU denominator: measured, not a
     datasheet number; the listed peak is reported beside it);
  2. the largest batch of the ImageNet64-small CD step (bf16, remat off, XLA attention)
     whose compiled memory fits 90% of the device's memory: one compile at
     `--probe_batch`, then the activation bytes scaled linearly, rounded down to a
     multiple of 8 (the timed compile at that batch confirms it fits);
  3. the train steps (the trainer's own training/step.py `StepBuilder`, random state, teacher
     and batch) at that batch, in this order until the time budget is spent: CD with XLA
     and cuDNN attention, diffusion and CT with the faster attention, then all three with
     remat (the config's policy, `dense_and_conv_saveable`); per variant the median step
     time, images/s, model FLOPs (runtime/flops.py, as the trainer logs them) and MFU;
     CD/diffusion and CT/diffusion ratios;
  4. K-step Multistep CM sampling against K single forwards, K = 1, 2, 4, 8
     (benchmarks/sampling.py).
Variants not reached within `--budget_s` are listed as skipped. Writes
`<out>/device_check.json` and prints a table.

What it needs beyond JAX with a GPU backend, flax, optax and orbax-checkpoint (the stock
GPU image): the pure-Python wheels of ml_collections, tqdm and Pillow's binary wheel, and
this repository (no install: run from its root). For Python 3.12 on manylinux x86-64,
fetch them on a machine with the network and bring them along (under 10 MiB):

    pip download --no-deps --only-binary=:all: --python-version 3.12 \\
        --platform manylinux2014_x86_64 -d wheels ml_collections tqdm pillow
    pip install --no-deps wheels/*.whl   # on the GPU machine (device_check.sh does it)

The check tests its prerequisites first and says in one line what is missing.
`--dry-run` does only that and lists what it would run (also on a CPU).
"""
import argparse
import importlib.util
import json
import os
import sys
import time
from typing import Any

# Modules the check imports, beyond the standard library: (module, pip name).
PREREQUISITES = (("jax", "jax"), ("flax", "flax"), ("optax", "optax"),
                 ("orbax.checkpoint", "orbax-checkpoint"), ("ml_collections", "ml_collections"),
                 ("absl", "absl-py"), ("etils", "etils"), ("tqdm", "tqdm"), ("PIL", "pillow"),
                 ("numpy", "numpy"))
CONFIG = "configs/imagenet64_cd.py"
MODES = ("diffusion", "ct", "cd")


def missing_prerequisites() -> list[str]:
  """The pip names of the prerequisites that cannot be imported here."""
  out = []
  for module, name in PREREQUISITES:
    try:
      found = importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):
      found = False
    if not found:
      out.append(name)
  return out


def variants() -> list[dict[str, Any]]:
  """The train-step variants in the order they are run (the budget cuts the tail).

  `attention` is 'xla', 'cudnn', or 'faster' / 'slower': of the two, by the CD steps
  timed first.
  """
  plan = [("cd", False, "xla"), ("cd", False, "cudnn"), ("diffusion", False, "faster"),
          ("ct", False, "faster"), ("cd", True, "faster"), ("diffusion", True, "faster"),
          ("ct", True, "faster"), ("diffusion", False, "slower"), ("ct", False, "slower")]
  return [{"mode": m, "remat": r, "attention": a} for m, r, a in plan]


def _name(v: dict[str, Any]) -> str:
  return f"{v['mode']}/{'remat' if v['remat'] else 'no_remat'}/{v['attention']}"


def measured_peak(size: int = 8192, repeats: int = 10) -> dict[str, float]:
  """bf16 matmul FLOP/s of this device, median of `repeats` after warm-up."""
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  from benchmarks import common  # pylint: disable=g-import-not-at-top
  a = jax.random.normal(jax.random.key(0), (size, size), jnp.bfloat16)
  b = jax.random.normal(jax.random.key(1), (size, size), jnp.bfloat16)
  dot = jax.jit(jnp.dot).lower(a, b).compile()
  seconds = common.median_seconds(dot, a, b, repeats=repeats)
  return {"size": size, "seconds": seconds, "flops_per_s": 2.0 * size**3 / seconds}


class Budget:
  """Seconds left of `--budget_s`, counted from the start of the check."""

  def __init__(self, seconds: float):
    self.end = time.time() + seconds

  def left(self) -> float:
    return self.end - time.time()


def run(args) -> dict[str, Any]:
  import jax  # pylint: disable=g-import-not-at-top
  from benchmarks import common  # pylint: disable=g-import-not-at-top
  from benchmarks import sampling  # pylint: disable=g-import-not-at-top
  from benchmarks import train_step as bench  # pylint: disable=g-import-not-at-top
  from multistep_cm.models import summary  # pylint: disable=g-import-not-at-top
  from multistep_cm.runtime import hardware  # pylint: disable=g-import-not-at-top
  from multistep_cm.training import step as train_step_lib  # pylint: disable=g-import-not-at-top

  budget = Budget(args.budget_s)
  report: dict[str, Any] = {"benchmark": "device_check", "date": common.today(),
                            "machine": common.machine(), "config": args.config,
                            "command": " ".join(["python -m benchmarks.device_check"]
                                                + sys.argv[1:])}
  peak = measured_peak(args.matmul_size)
  report["peak"] = {**peak, "listed_flops_per_s": hardware.peak_flops_per_device()}
  base = summary.load_config(args.config)
  base.mesh.data, base.mesh.fsdp = -1, 1
  report["remat_policy"] = base.model.get("remat_policy", "nothing_saveable")
  overrides = lambda v: {"dtype": "bfloat16", "remat": v["remat"],
                         "attention_impl": v["attention"]}

  # 2. The batch: one probe compile, activations scaled linearly.
  limit = bench.device_memory_limit(args.memory_limit_gb)
  probe = bench.memory_bytes(train_step_lib.StepBuilder.from_config(bench.mode_config(
      base, "cd", args.probe_batch, overrides(variants()[0]))).compile())
  # State, teacher and outputs are fixed; the temporaries (activations) grow with the batch.
  fixed = probe["argument"] + probe["output"] - probe["alias"]
  per_example = max(probe["temp"], 1) / args.probe_batch
  batch = args.batch or max(8, int((0.9 * limit - fixed) / per_example) // 8 * 8)
  report["batch"] = batch
  report["batch_probe"] = {"probe_batch": args.probe_batch, "memory_bytes": probe,
                           "limit_bytes": limit}

  # 3. Train steps, in order, while the budget lasts.
  results, skipped = {}, []
  for v in variants():
    if v["attention"] in ("faster", "slower"):
      order = sorted(("xla", "cudnn"), key=lambda a: results.get(
          f"cd/no_remat/{a}", {}).get("step_seconds", float("inf")))
      report["attention"] = order[0]
      v = {**v, "attention": order[0] if v["attention"] == "faster" else order[1]}
    name = _name(v)
    if name in results:
      continue
    if budget.left() < args.reserve_s:
      skipped.append(name)
      continue
    try:
      builder = train_step_lib.StepBuilder.from_config(bench.mode_config(base, v["mode"], batch,
                                                             overrides(v)))
      traced = builder.trace()
      model_flops, hardware_flops = builder.flops(traced)
      t0 = time.time()
      compiled = builder.compile(traced)
      compile_s = time.time() - t0
      holder = list(bench.random_inputs(builder))

      def step(compiled=compiled, holder=holder):
        holder[0], metrics = compiled(*holder)
        jax.block_until_ready((holder[0], metrics))

      times = common.interleaved_times({"step": step}, args.repeats, warmup=2)
      seconds = common.summarize(times["step"]["wall"])["median"]
      per_device = model_flops.flops / builder.mesh.size
      results[name] = {
          "mode": v["mode"], "remat": v["remat"], "attention": v["attention"],
          "step_seconds": seconds, "images_per_s": batch / seconds, "compile_s": compile_s,
          "model_flops_per_step": model_flops.flops,
          "hardware_flops_per_step": hardware_flops.flops,
          "mfu": per_device / seconds / peak["flops_per_s"],
          "hfu": hardware_flops.flops / builder.mesh.size / seconds / peak["flops_per_s"],
          "memory_bytes": bench.memory_bytes(compiled)}
      del holder, compiled
    except Exception as e:  # pylint: disable=broad-except
      results[name] = {"error": f"{type(e).__name__}: {str(e).splitlines()[0][:300]}"}
    print(f"[{args.budget_s - budget.left():6.0f}s] {name}: "
          f"{results[name].get('mfu', results[name].get('error'))}", flush=True)
  report["steps"], report["skipped"] = results, skipped
  ratios = {}
  for remat in ("no_remat", "remat"):
    base_run = results.get(f"diffusion/{remat}/{report.get('attention', 'xla')}", {})
    for mode in ("ct", "cd"):
      run_ = results.get(f"{mode}/{remat}/{report.get('attention', 'xla')}", {})
      if "step_seconds" in base_run and "step_seconds" in run_:
        ratios[f"{mode}_over_diffusion/{remat}"] = (run_["step_seconds"]
                                                   / base_run["step_seconds"])
  report["ratios"] = ratios

  # 4. Sampling: K-step Multistep CM against K forwards.
  if budget.left() >= args.reserve_s:
    sampling_args = sampling.parse_args([
        f"--config={args.config}", "--dtype=bfloat16", f"--batch={args.sample_batch}",
        "--steps=1,2,4,8", "--samplers=mcm", "--repeats=5", "--warmup=1"])
    report["sampling"] = {k: v for k, v in sampling.run(sampling_args).items()
                          if k in ("batch", "forward_seconds", "forward_flops", "cases")}
  else:
    skipped.append("sampling")
  report["elapsed_s"] = args.budget_s - budget.left()
  return report


def format_table(report: dict[str, Any]) -> str:
  listed = report["peak"]["listed_flops_per_s"]
  lines = [f"{report['machine']['device_kind']}, batch {report['batch']}, measured bf16 "
           f"matmul peak {report['peak']['flops_per_s'] / 1e12:.3g} TFLOP/s (listed: "
           f"{f'{listed / 1e12:.3g}' if listed else 'none'})",
           "| step | ms | images/s | MFU | HFU |", "|---|---|---|---|---|"]
  for name, r in report["steps"].items():
    if "error" in r:
      lines.append(f"| {name} | {r['error']} | | | |")
    else:
      lines.append(f"| {name} | {1e3 * r['step_seconds']:.1f} | {r['images_per_s']:.0f} | "
                   f"{100 * r['mfu']:.1f}% | {100 * r['hfu']:.1f}% |")
  for key, value in report["ratios"].items():
    lines.append(f"{key}: {value:.3f}")
  for name, case in report.get("sampling", {}).get("cases", {}).items():
    lines.append(f"sampling {name}: {case['ratio']:.3f} x K forwards")
  if report["skipped"]:
    lines.append(f"skipped (time budget): {', '.join(report['skipped'])}")
  return "\n".join(lines)


def parse_args(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--config", default=CONFIG)
  parser.add_argument("--out", default=".", help="directory for device_check.json")
  parser.add_argument("--budget_s", type=float, default=420.0,
                      help="wall-clock budget; later variants are skipped past it")
  parser.add_argument("--reserve_s", type=float, default=45.0,
                      help="start no variant with less than this left")
  parser.add_argument("--batch", type=int, default=0, help="fix the batch (0: probe)")
  parser.add_argument("--probe_batch", type=int, default=32)
  parser.add_argument("--sample_batch", type=int, default=64)
  parser.add_argument("--memory_limit_gb", type=float, default=None)
  parser.add_argument("--matmul_size", type=int, default=8192)
  parser.add_argument("--repeats", type=int, default=5)
  parser.add_argument("--allow_cpu", action="store_true", help="run on a CPU (tests only)")
  parser.add_argument("--dry-run", "--dry_run", dest="dry_run", action="store_true",
                      help="check prerequisites and list the plan; run nothing")
  return parser.parse_args(argv)


def main(argv=None) -> int:
  args = parse_args(argv)
  missing = missing_prerequisites()
  if missing:
    print(f"device_check: missing {', '.join(missing)}: pip install --no-deps the wheels "
          "named in benchmarks/device_check.py's docstring", file=sys.stderr)
    return 2
  import jax  # pylint: disable=g-import-not-at-top
  platform = jax.devices()[0].platform
  plan = [_name(v) for v in variants()]
  print(f"device_check: {jax.device_count()} x {jax.devices()[0].device_kind} ({platform}), "
        f"jax {jax.__version__}; config {args.config}; budget {args.budget_s:.0f} s")
  from multistep_cm.models import summary  # pylint: disable=g-import-not-at-top
  policy = summary.load_config(args.config).model.get("remat_policy", "nothing_saveable")
  print("plan: bf16 matmul peak; batch probe (cd, no remat, xla); train steps "
        + ", ".join(plan) + f" (remat: {policy}); sampling mcm K=1,2,4,8 vs K forwards")
  if args.dry_run:
    ok = platform == "gpu"
    print(f"prerequisites: all importable; device: {'ok' if ok else 'not a GPU (' + platform + ')'}")
    return 0
  if platform != "gpu" and not args.allow_cpu:
    print(f"device_check: needs a GPU, found {platform} (--allow_cpu to run anyway)",
          file=sys.stderr)
    return 2
  report = run(args)
  os.makedirs(args.out, exist_ok=True)
  path = os.path.join(args.out, "device_check.json")
  with open(path, "w") as fh:
    json.dump(report, fh, indent=2)
  print(format_table(report))
  print(f"wrote {path}")
  return 0


if __name__ == "__main__":
  sys.exit(main())
