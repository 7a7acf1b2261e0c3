"""Forward and forward+backward speed of the small model presets, as a fraction of matmul peak.

    python -m benchmarks.bench_models --out /tmp/bench_models.json

For each preset: the median wall time of a jitted forward pass and of a jitted
forward+backward (gradient of a squared error w.r.t. the parameters) after
warm-up, the FLOPs of the same compiled executables from XLA's cost analysis,
the achieved FLOP/s, and that over the dense float32 matmul FLOP/s of this
machine measured in the same run (a square `jnp.dot`, timed the same way).
The ratios are what is comparable across machines, not the times. The mid
stack is unrolled (`scan_blocks=False`) because XLA's cost analysis counts a
loop body once; JSON goes to stdout (and to --out).
"""
import argparse
import datetime
import json
import os
import platform
import statistics
import time

import flax.linen as nn
import jax
import jax.numpy as jnp

from multistep_cm import models

DEFAULT_PRESETS = ("digits8", "digits16", "small32", "mlp_toy")


def median_seconds(fn, *args, repeats: int) -> float:
  """Median wall time of `fn(*args)` over `repeats` calls after two warm-up calls."""
  for _ in range(2):
    jax.block_until_ready(fn(*args))
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    jax.block_until_ready(fn(*args))
    times.append(time.perf_counter() - start)
  return statistics.median(times)


def compiled_flops(compiled) -> float:
  cost = compiled.cost_analysis()
  cost = cost[0] if isinstance(cost, (list, tuple)) else cost
  return float(cost["flops"])


def matmul_peak(size: int, repeats: int) -> dict:
  """Dense float32 matmul FLOP/s: the machine's reference for the ratios."""
  a = jax.random.normal(jax.random.key(0), (size, size), jnp.float32)
  b = jax.random.normal(jax.random.key(1), (size, size), jnp.float32)
  dot = jax.jit(jnp.dot).lower(a, b).compile()
  seconds = median_seconds(dot, a, b, repeats=repeats)
  flops = 2.0 * size**3
  return {"size": size, "seconds": seconds, "flops": flops, "flops_per_s": flops / seconds}


def bench_preset(name: str, batch: int, repeats: int, peak: float) -> dict:
  """Times forward and forward+backward of preset `name` at `batch`."""
  overrides = {} if name == "mlp_toy" else {"scan_blocks": False}
  model = models.get_model(name, **overrides)
  z_spec, _, _ = models.input_specs(model, batch)
  keys = jax.random.split(jax.random.key(0), 4)
  z = jax.random.normal(keys[0], z_spec.shape)
  logsnr = jax.random.uniform(keys[1], (batch,), minval=-10.0, maxval=10.0)
  labels = jax.random.randint(keys[2], (batch,), 0, model.num_classes + 1)
  params = nn.meta.unbox(model.init({"params": keys[3]}, z, logsnr, labels)["params"])

  def forward(p, z, logsnr, labels):
    return model.apply({"params": p}, z, logsnr, labels)

  def loss(p, z, logsnr, labels):
    return jnp.mean(jnp.square(forward(p, z, logsnr, labels) - z))

  result = {"params": models.param_count(model), "batch": batch}
  for label, fn in (("forward", forward), ("forward_backward", jax.grad(loss))):
    compiled = jax.jit(fn).lower(params, z, logsnr, labels).compile()
    seconds = median_seconds(compiled, params, z, logsnr, labels, repeats=repeats)
    flops = compiled_flops(compiled)
    result[label] = {"seconds": seconds, "flops": flops, "flops_per_s": flops / seconds,
                     "fraction_of_matmul": flops / seconds / peak}
  return result


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--presets", default=",".join(DEFAULT_PRESETS))
  parser.add_argument("--batch", type=int, default=64)
  parser.add_argument("--repeats", type=int, default=10)
  parser.add_argument("--matmul_size", type=int, default=2048)
  parser.add_argument("--out", default=None, help="also write the JSON here")
  args = parser.parse_args()

  peak = matmul_peak(args.matmul_size, args.repeats)
  report = {
      "date": datetime.date.today().isoformat(),
      "machine": {"platform": platform.platform(), "processor": platform.processor(),
                  "cpu_count": os.cpu_count(), "devices": str(jax.devices()),
                  "jax": jax.__version__},
      "matmul_float32": peak,
      "presets": {name: bench_preset(name, args.batch, args.repeats, peak["flops_per_s"])
                  for name in args.presets.split(",")},
  }
  text = json.dumps(report, indent=2)
  print(text)
  if args.out:
    with open(args.out, "w") as f:
      f.write(text + "\n")


if __name__ == "__main__":
  main()
