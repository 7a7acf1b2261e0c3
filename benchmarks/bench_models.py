"""Forward and forward+backward speed of the small model presets, as a fraction of matmul peak.

    python -m benchmarks.bench_models --out /tmp/bench_models.json

For each preset: the median wall time of a jitted forward pass and of a jitted
forward+backward (gradient of a squared error w.r.t. the parameters) after
warm-up, the FLOPs of the same traced functions (matmuls and convolutions counted
on the jaxpr by the package's FLOP counter, runtime/flops.py), the achieved FLOP/s, and
that over the dense float32 matmul FLOP/s of this machine measured in the same run
(a square `jnp.dot`, timed the same way). The ratios are what is comparable across
machines, not the times. The mid stack is unrolled (`scan_blocks=False`), as in the
recorded results; the jaxpr counter would count a scanned stack in full too, so this
only affects the timings. JSON goes to stdout (and to --out).
"""
import argparse

import flax.linen as nn
import jax
import jax.numpy as jnp

from benchmarks import common
from multistep_cm import models
from multistep_cm.runtime import flops as flops_lib

DEFAULT_PRESETS = ("digits8", "digits16", "small32", "mlp_toy")


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
    traced = jax.jit(fn).trace(params, z, logsnr, labels)
    compiled = traced.lower().compile()
    seconds = common.median_seconds(compiled, params, z, logsnr, labels, repeats=repeats)
    flops = flops_lib.count_flops(traced.jaxpr).flops
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

  peak = common.matmul_peak(args.matmul_size, args.repeats)
  report = {
      "date": common.today(),
      "machine": common.machine(),
      "matmul_float32": peak,
      "presets": {name: bench_preset(name, args.batch, args.repeats, peak["flops_per_s"])
                  for name in args.presets.split(",")},
  }
  common.emit(report, args.out)


if __name__ == "__main__":
  main()
