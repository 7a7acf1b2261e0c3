"""K-step sampling time against K single forward passes of the same network.

    python -m benchmarks.sampling --out benchmarks/results/sampling_DATE_TAG.json

For each K, the framework's sampler (`generation.make_sample_fn`: `sample_mcm` with K
student steps, or diffusion `sample` with K aDDIM steps; one `fori_loop`, jitted)
is timed against K calls of the jitted denoiser `f(z, t) -> x̂` chained through
their outputs (so each waits for the one before, as the sampler's steps do) and
dispatched from Python. The ratio is the cost of the loop and the DDIM/aDDIM
updates beyond the K network evaluations; the variants alternate, medians.
`forward_flops` is the matmul and convolution FLOPs of one forward pass, counted
on its jaxpr by the package's FLOP counter (runtime/flops.py).
"""
import argparse
import sys
from typing import Any

import jax
import jax.numpy as jnp

from benchmarks import common
from benchmarks import train_step
from multistep_cm.config import build as config_build
from multistep_cm import models
from multistep_cm.models import denoiser
from multistep_cm.models import summary
from multistep_cm.runtime import flops
from multistep_cm.sampling import generation

TARGET = 1.05
SAMPLERS = ("mcm", "addim")


def run(args) -> dict[str, Any]:
  base = summary.load_config(args.config)
  if args.preset:
    base = train_step.with_preset(base, args.preset)
  base = train_step.mode_config(base, "cd", args.batch, {})
  if args.dtype:
    base.model.dtype = args.dtype
  model, schedule = config_build.get_model(base), config_build.get_schedule(base)
  keys = jax.random.split(jax.random.key(0), 3)
  params = train_step.random_params(model, keys[0])
  z = jax.random.normal(keys[1], models.input_specs(model, args.batch)[0].shape)
  labels = (jax.random.randint(keys[2], (args.batch,), 0, model.num_classes, jnp.int32)
            if model.num_classes else None)

  def forward(params, z, t):
    return denoiser.make_denoise_fn(model, params, schedule, labels)(
        z, jnp.full((z.shape[0],), t, jnp.float32))

  traced = jax.jit(forward).trace(params, z, jnp.float32(0.5))
  forward_flops = flops.count_flops(traced.jaxpr).flops
  forward = traced.lower().compile()
  runners, cases = {}, []
  for sampler in args.samplers.split(","):
    for steps in (int(k) for k in args.steps.split(",")):
      sample = jax.jit(generation.make_sample_fn(model, schedule,
                                                 generation.SamplerSpec(sampler, steps)))
      sample = sample.lower(params, z, labels).compile()

      def chain(steps=steps):
        out = z
        for i in range(steps):
          out = forward(params, out, jnp.float32(1.0 - i / steps))
        jax.block_until_ready(out)

      name = f"{sampler}_{steps}"
      runners[f"{name}/sample"] = lambda sample=sample: jax.block_until_ready(
          sample(params, z, labels))
      runners[f"{name}/forwards"] = chain
      cases.append((name, sampler, steps))
  runners["forward"] = lambda: jax.block_until_ready(forward(params, z, jnp.float32(0.5)))
  times = common.interleaved_times(runners, args.repeats, args.warmup)
  med = {k: common.summarize(v["wall"])["median"] for k, v in times.items()}
  cpu = {k: common.summarize(v["cpu"])["median"] for k, v in times.items()}
  results = {}
  for name, sampler, steps in cases:
    sample_s, forwards_s = med[f"{name}/sample"], med[f"{name}/forwards"]
    results[name] = {
        "sampler": sampler, "steps": steps, "sample_seconds": sample_s,
        "forwards_seconds": forwards_s, "sample_cpu_seconds": cpu[f"{name}/sample"],
        "forwards_cpu_seconds": cpu[f"{name}/forwards"],
        "ratio": sample_s / forwards_s,
        "ratio_cpu": cpu[f"{name}/sample"] / cpu[f"{name}/forwards"],
        "ratio_vs_k_single_forwards": sample_s / (steps * med["forward"]),
        "target": TARGET, "within_target": sample_s / forwards_s <= TARGET}
  return {"benchmark": "sampling", "date": common.today(), "machine": common.machine(),
          "command": " ".join(["python -m benchmarks.sampling"] + sys.argv[1:]),
          "config": args.config, "model": base.model.to_dict(), "batch": args.batch,
          "forward_seconds": med["forward"], "forward_flops": forward_flops,
          "timing": {"repeats": args.repeats, "warmup": args.warmup,
                     "order": "all variants alternate within each repetition; medians"},
          "cases": results}


def parse_args(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--config", default="configs/digits_cd.py", help="config file[:arg]")
  parser.add_argument("--preset", default=None,
                      help="model preset override, at the data shape it was built for")
  parser.add_argument("--dtype", default=None, help="model dtype override")
  parser.add_argument("--batch", type=int, default=128)
  parser.add_argument("--steps", default="1,2,4,8", help="K values")
  parser.add_argument("--samplers", default="mcm,addim", help=f"of {SAMPLERS}")
  parser.add_argument("--repeats", type=int, default=10)
  parser.add_argument("--warmup", type=int, default=2)
  parser.add_argument("--out", default=None, help="also write the JSON here")
  args = parser.parse_args(argv)
  common.check_choices(parser, "samplers", args.samplers, SAMPLERS)
  return args


main = common.main_for(parse_args, run)


if __name__ == "__main__":
  main()
