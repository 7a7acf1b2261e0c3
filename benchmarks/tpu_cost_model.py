"""Can XLA's TPU cost model estimate our step? Programs compiled for one v5e chip on this host.

    python -m benchmarks.tpu_cost_model --out /tmp/tpu_cost_model.json [--cases=...]

Each case (a plain matmul, a convolution, the UViT's parts at ImageNet64-small shapes, the
whole unrolled ImageNet64-small forward and forward+backward at 32 images, the per-chip
batch of the paper's v5e-64 step) is compiled for one chip of a v5e:2x2 topology, nothing
run. For each it reports the FLOPs counted on the jaxpr (runtime/flops.py) and by XLA, XLA's
`optimal_seconds`, and the sum of the per-instruction `estimated_cycles` that the TPU
compiler writes into the compiled HLO's backend configs, as seconds at the v5e's clock
(`CLOCK_HZ`), with the fraction of the chip's bf16 peak it implies. Both are XLA's
estimates, not measurements: docs/performance.md says which one can be believed and why.
Needs libtpu (`pip install -e '.[tpu]'`); JSON goes to stdout (and to --out).
"""
import argparse
import re
import sys
import time

import flax.linen as nn
import jax
import jax.numpy as jnp

from benchmarks import common
from multistep_cm import compile_report
from multistep_cm import models
from multistep_cm.models import partitioning
from multistep_cm.models import uvit
from multistep_cm.runtime import flops as flops_lib
from multistep_cm.runtime import hardware

# v5e: 197 TFLOP/s bf16 from 4 MXUs of 128 x 128 multiply-adds per cycle: 1.5 GHz.
CLOCK_HZ = 197e12 / (4 * 128 * 128 * 2)
BATCH = 32  # images per chip of the paper's IN64-small step (2048 on v5e-64)
CASES = ("matmul", "conv3x3", "attention", "resblock", "transformer_32", "transformer_16",
         "forward", "forward_backward")


def _cases(device):
  """`{name: (fn, abstract args)}` at ImageNet64-small shapes on `device`."""
  sharding = jax.sharding.SingleDeviceSharding(device)
  spec = lambda shape, dtype=jnp.float32: jax.ShapeDtypeStruct(shape, dtype, sharding=sharding)
  bf16 = jnp.bfloat16

  def module(mod, x_shape, cond_dim=2048):
    abstract = jax.eval_shape(
        lambda k: mod.init(k, jnp.zeros(x_shape), jnp.zeros((BATCH, cond_dim))),
        jax.random.key(0))
    params = jax.tree.map(lambda a: spec(a.shape, a.dtype),
                          partitioning.unbox(abstract["params"]))
    return (lambda p, x, c: mod.apply({"params": p}, x, c),
            [params, spec(x_shape), spec((BATCH, cond_dim))])

  model = models.get_model("imagenet64_small", scan_blocks=False, dtype="bfloat16",
                           remat=False)
  params = jax.tree.map(lambda a: spec(a.shape, a.dtype),
                        nn.meta.unbox(models.abstract_variables(model)["params"]))
  inputs = [spec(s.shape, s.dtype) for s in models.input_specs(model, BATCH)]
  forward = lambda p, z, lam, y: model.apply({"params": p}, z, lam, y, train=False)
  loss = lambda p, *a: jnp.mean(jnp.square(forward(p, *a).astype(jnp.float32)))
  return {
      "matmul": (lambda a, b: a @ b, [spec((8192, 8192), bf16), spec((8192, 8192), bf16)]),
      "conv3x3": (lambda x, w: jax.lax.conv_general_dilated(
          x, w, (1, 1), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC")),
                  [spec((BATCH, 64, 64, 256), bf16), spec((3, 3, 256, 256), bf16)]),
      "attention": (jax.nn.dot_product_attention, [spec((BATCH, 256, 8, 128), bf16)] * 3),
      "resblock": module(uvit.ResBlock(256, dtype=bf16), (BATCH, 64, 64, 256)),
      "transformer_32": module(uvit.TransformerBlock(512, dtype=bf16), (BATCH, 32, 32, 512)),
      "transformer_16": module(uvit.TransformerBlock(1024, dtype=bf16), (BATCH, 16, 16, 1024)),
      "forward": (forward, [params] + inputs),
      "forward_backward": (jax.grad(loss), [params] + inputs),
  }


def estimated_cycles(hlo_text: str) -> dict[str, int]:
  """The compiler's per-instruction cycle estimates in the entry computation, summed, with
  how many instructions carry one, how many of those the cost model marks invalid, and
  how many while loops the program has (their bodies would need their trip counts)."""
  entry = hlo_text[hlo_text.index("ENTRY"):]
  found = [(int(m.group(1)), "COST_MODEL_TYPE_INVALID" in line) for line in entry.splitlines()
           if (m := re.search(r'"estimated_cycles":"(\d+)"', line))]
  return {"cycles": sum(c for c, _ in found), "instructions": len(found),
          "invalid": sum(bad for _, bad in found),
          "while_loops": len(re.findall(r"\bwhile\(", hlo_text))}


def run_case(name, fn, args, peak: float) -> dict:
  t0 = time.time()
  jaxpr_flops = flops_lib.count_flops(jax.make_jaxpr(fn)(*args)).flops
  compiled = jax.jit(fn).lower(*args).compile()
  cost = compiled.cost_analysis()
  cost = cost[0] if isinstance(cost, (list, tuple)) else cost
  cycles = estimated_cycles(compiled.as_text())
  seconds = cycles["cycles"] / CLOCK_HZ
  return {"case": name, "compile_s": round(time.time() - t0, 1), "jaxpr_flops": jaxpr_flops,
          "xla_flops": cost.get("flops"), "xla_optimal_seconds": cost.get("optimal_seconds"),
          **cycles, "cycles_seconds": seconds,
          "cycles_fraction_of_peak": jaxpr_flops / seconds / peak if seconds else None}


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--cases", default=",".join(CASES))
  parser.add_argument("--out", default=None)
  args = parser.parse_args()
  devices, topology = compile_report.topology_devices("v5e:2x2")
  peak = hardware.chip_spec(devices[0].device_kind)[1]
  cases = _cases(devices[0])
  rows = []
  for name in common.check_choices(parser, "cases", args.cases, CASES):
    rows.append(run_case(name, *cases[name], peak))
    print(f"{name}: {rows[-1]['cycles_seconds'] * 1e3:.3f} ms from the cycle estimates, "
          f"compiled in {rows[-1]['compile_s']} s", file=sys.stderr, flush=True)
  common.emit({"benchmark": "tpu_cost_model", "date": common.today(), "machine": common.machine(),
               "topology": topology, "device": devices[0].device_kind, "peak_flops": peak,
               "clock_hz": CLOCK_HZ, "batch_per_chip": BATCH, "cases": rows}, args.out)


if __name__ == "__main__":
  main()
