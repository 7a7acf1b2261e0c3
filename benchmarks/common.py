"""What every benchmark shares: the machine's description, interleaved timing, the matmul
reference and the JSON report.

Times on a machine shared with other jobs drift by tens of percent within a minute,
so the benchmarks compare variants measured in the same run, alternating between
them, and report medians. Each sample records the wall time and the process CPU
time: CPU time counts the work the process did, which other jobs on the machine
barely change, so CPU-time ratios are the stable ones on a loaded host (on an idle
host the two agree up to the parallel efficiency).
"""
import argparse
import datetime
import json
import os
import platform
import statistics
import time
from collections.abc import Callable, Mapping
from typing import Any

import jax
import jax.numpy as jnp

from multistep_cm.runtime import hardware


def machine() -> dict[str, Any]:
  """Where the numbers were measured."""
  device = jax.devices()[0]
  return {"platform": platform.platform(), "processor": platform.processor(),
          "cpu_count": os.cpu_count(), "devices": str(jax.devices()),
          "device_kind": device.device_kind, "num_devices": jax.device_count(),
          "jax": jax.__version__}


def today() -> str:
  return datetime.date.today().isoformat()


def summarize(samples: list[float]) -> dict[str, float]:
  return {"median": statistics.median(samples), "min": min(samples), "n": len(samples)}


def interleaved_times(fns: Mapping[str, Callable[[], Any]], repeats: int,
                      warmup: int = 2) -> dict[str, dict[str, list[float]]]:
  """Wall and process-CPU seconds of each `fn()` (which must block), variants alternating.

  Every variant runs `warmup` times first; then each repetition runs every variant
  once in turn, so drift on the machine hits all variants alike.
  """
  for fn in fns.values():
    for _ in range(warmup):
      fn()
  out = {name: {"wall": [], "cpu": []} for name in fns}
  for _ in range(repeats):
    for name, fn in fns.items():
      wall, cpu = time.perf_counter(), time.process_time()
      fn()
      out[name]["cpu"].append(time.process_time() - cpu)
      out[name]["wall"].append(time.perf_counter() - wall)
  return out


def median_seconds(fn, *args, repeats: int) -> float:
  """Median wall time of `fn(*args)` over `repeats` calls after two warm-up calls."""
  times = interleaved_times({"fn": lambda: jax.block_until_ready(fn(*args))}, repeats)
  return statistics.median(times["fn"]["wall"])


def matmul_peak(size: int, repeats: int) -> dict[str, float]:
  """Dense float32 matmul FLOP/s: the reference for MFU on devices without a listed peak."""
  a = jax.random.normal(jax.random.key(0), (size, size), jnp.float32)
  b = jax.random.normal(jax.random.key(1), (size, size), jnp.float32)
  dot = jax.jit(jnp.dot).lower(a, b).compile()
  seconds = median_seconds(dot, a, b, repeats=repeats)
  flops = 2.0 * size**3
  return {"size": size, "seconds": seconds, "flops": flops, "flops_per_s": flops / seconds}


def peak_flops(matmul_size: int, repeats: int) -> dict[str, Any]:
  """The device's listed bf16 peak (`hardware`), or this machine's matmul rate measured now."""
  listed = hardware.peak_flops_per_device()
  if listed:
    return {"flops_per_s": listed, "source": f"listed peak for {jax.devices()[0].device_kind}"}
  measured = matmul_peak(matmul_size, repeats)
  return {"flops_per_s": measured["flops_per_s"],
          "source": f"measured float32 matmul {matmul_size}x{matmul_size} in this run",
          "matmul": measured}


def emit(report: dict[str, Any], out: str | None) -> None:
  """Prints the JSON report and writes it to `out` when given."""
  text = json.dumps(report, indent=2)
  print(text)
  if out:
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    with open(out, "w") as f:
      f.write(text + "\n")


def check_choices(parser: argparse.ArgumentParser, flag: str, value: str,
                  allowed) -> list[str]:
  """`value.split(',')`, or a parser error naming the entries not in `allowed`."""
  items = value.split(",")
  unknown = sorted(set(items) - set(allowed))
  if unknown:
    parser.error(f"--{flag}: {unknown} not in {tuple(allowed)}")
  return items


def main_for(parse_args: Callable, run: Callable) -> Callable:
  """A benchmark's `main(argv)`: parse, run, print and write the JSON, return the report."""
  def main(argv=None):
    args = parse_args(argv)
    report = run(args)
    emit(report, args.out)
    return report
  return main
