"""Train-step speed of the diffusion, CT, CD (and Direct) steps of one model and batch.

    python -m benchmarks.train_step --out benchmarks/results/train_step_DATE_TAG.json
    python -m benchmarks.train_step --config=configs/imagenet64_cd.py --batch=max \
        --modes=diffusion,ct,cd --model=attention_impl=cudnn   # GPU: the largest batch

Each step is the trainer's own (training/step.py: `StepBuilder`, sharded, donated, compiled
ahead of time) built from one config with only `loss.mode` changed, run on a
random state, a random teacher and a random batch already on the devices. Modes
are timed in alternation after warm-up; the report has per mode the median step
time (wall and process CPU), images/s, the step's model FLOPs (`StepBuilder.flops`:
matmuls and convolutions counted on the jaxpr by runtime/flops.py, traced with remat off;
the numerator of the MFU the trainer logs), the achieved FLOP/s per device and the
MFU against the device's listed peak (`runtime/hardware.py`) or, on a CPU, against a dense
float32 matmul timed in the same run; and the ratios CT/diffusion and CD/diffusion
against theory (4/3, 5/3: one and two extra forwards beside forward + backward) and
the targets.

The jaxpr counter counts a scan's body `length` times (the scanned mid stack
complete) but a `while` loop's body once: the Direct mode's teacher loop runs
max(n_rel) iterations, a count known only at run time, so its FLOPs are a lower
bound, which `flops_note` says (from `FlopCount.exact`). `--batch=max` compiles at
doubling batch sizes and keeps the largest whose memory analysis fits the device's
memory (`--memory_limit_gb` where the device does not report it).
"""
import argparse
import ast
import sys
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections

from benchmarks import common
from multistep_cm import models
from multistep_cm.models import partitioning
from multistep_cm.models import presets
from multistep_cm.models import summary
from multistep_cm.training import step as train_step_lib

MODES = ("diffusion", "ct", "cd", "direct")
# Forward units beside the 3 of forward + backward: CT's target forward, CD's teacher too.
THEORY = {"ct": 4 / 3, "cd": 5 / 3}
TARGETS = {"ct": 1.4, "cd": 1.75}


def mode_config(base: ml_collections.ConfigDict, mode: str, batch: int,
                overrides: dict[str, Any]) -> ml_collections.ConfigDict:
  """`base` with `loss.mode`, batch and model overrides; nothing is read from disk."""
  config = ml_collections.ConfigDict(base.to_dict())
  config.loss.mode = mode
  config.batch_size = batch
  config.teacher_checkpoint, config.init_from = "", ""
  for key, value in overrides.items():
    config.model[key] = value
  return config


def with_preset(config: ml_collections.ConfigDict, preset: str) -> ml_collections.ConfigDict:
  """`config` with its model switched to `preset`, and its data to the shape the preset
  was built for (the trainer takes image size, channels and classes from the data)."""
  config.model.preset = preset
  for key in ("image_size", "num_channels", "num_classes", "data_dim"):
    if key in presets.PRESETS[preset]:
      config.data[key] = presets.PRESETS[preset][key]
  return config


def random_params(model, key):
  """Fresh parameters of `model` (the trainer's initialiser), unboxed."""
  return partitioning.unbox(train_step_lib.init_params(model, key))


def random_inputs(builder: train_step_lib.StepBuilder, seed: int = 0):
  """`(state, batch, teacher)` materialised under the step's shardings."""
  config = builder.config
  k_state, k_teacher, k_data, k_label = jax.random.split(jax.random.key(seed), 4)
  create = lambda key: train_step_lib.create_state(
      random_params(builder.model, key), builder.tx, jax.random.key_data(key),
      len(config.ema_decays))
  state = jax.jit(create, out_shardings=builder.layout.shardings)(k_state)
  teacher = None
  if builder.teacher_abstract is not None:
    shardings = jax.tree.map(lambda a: a.sharding, builder.teacher_abstract)
    teacher = jax.jit(lambda k: random_params(builder.teacher_model, k),
                      out_shardings=shardings)(k_teacher)
  spec = builder.abstract_batch
  num_labels = max(builder.model.num_classes, 1)
  batch = {
      builder.data_key: jax.random.uniform(k_data, spec[builder.data_key].shape, jnp.float32,
                                           -1.0, 1.0),
      "label": jax.random.randint(k_label, spec["label"].shape, 0, num_labels, jnp.int32)}
  return state, jax.device_put(batch, builder.batch_sharding), teacher


def memory_bytes(compiled) -> dict[str, int] | None:
  """Per-device bytes from XLA's memory analysis; `peak` = arguments + outputs - aliased + temp."""
  stats = compiled.memory_analysis()
  if stats is None:
    return None
  out = {k: int(getattr(stats, f"{k}_size_in_bytes"))
         for k in ("argument", "output", "alias", "temp")}
  out["peak"] = out["argument"] + out["output"] - out["alias"] + out["temp"]
  return out


def device_memory_limit(limit_gb: float | None) -> float | None:
  if limit_gb:
    return limit_gb * 2**30
  stats = jax.devices()[0].memory_stats()
  return float(stats["bytes_limit"]) if stats and "bytes_limit" in stats else None


def largest_batch(peak_bytes: Callable[[int], float], start: int,
                  limit: float) -> dict[str, Any]:
  """Doubles the batch from `start` while `peak_bytes(batch)` stays within `limit`."""
  tried, best, batch = {}, None, start
  while True:
    tried[batch] = peak_bytes(batch)
    if tried[batch] > limit:
      break
    best, batch = batch, 2 * batch
  if best is None:
    raise ValueError(f"--batch=max: even batch {start} needs {tried[start] / 2**30:.1f} GiB "
                     f"per device, over the limit of {limit / 2**30:.1f} GiB")
  return {"batch": best, "limit_bytes": limit, "peak_bytes_by_batch": tried}


def ratio(results, mode: str, base: str = "diffusion") -> dict[str, Any]:
  """Medians of `mode` over those of `base`, for wall and CPU time and for FLOPs."""
  a, b = results[mode], results[base]
  out = {"wall": a["step_seconds"] / b["step_seconds"],
         "cpu": a["step_cpu_seconds"] / b["step_cpu_seconds"],
         "flops": a["flops_per_step"] / b["flops_per_step"]}
  if mode in TARGETS:
    out.update(theory=THEORY[mode], target=TARGETS[mode],
               within_target=out["wall"] <= TARGETS[mode])
  return out


def run(args) -> dict[str, Any]:
  base = summary.load_config(args.config)
  if args.preset:
    base = with_preset(base, args.preset)
  overrides = {}
  if args.dtype:
    overrides["dtype"] = args.dtype
  for item in args.model:
    key, _, value = item.partition("=")
    try:
      overrides[key] = ast.literal_eval(value)
    except (ValueError, SyntaxError):
      overrides[key] = value  # a plain string, e.g. a policy name
  if args.unroll:
    overrides["scan_blocks"] = False
  if args.mesh:
    base.mesh.data, base.mesh.fsdp = (int(v) for v in args.mesh.split(","))
  modes = args.modes.split(",")
  report = {"benchmark": "train_step", "date": common.today(), "machine": common.machine(),
            "command": " ".join(["python -m benchmarks.train_step"] + sys.argv[1:]),
            "config": args.config, "model_overrides": overrides}
  batch = args.batch
  if batch == "max":
    limit = device_memory_limit(args.memory_limit_gb)
    if limit is None:
      raise ValueError("--batch=max needs a device that reports its memory, or "
                       "--memory_limit_gb")
    # The last mode listed is searched; list the most memory-hungry (cd) last.
    peak_bytes = lambda b: memory_bytes(train_step_lib.StepBuilder.from_config(
        mode_config(base, modes[-1], b, overrides)).compile())["peak"]
    search = largest_batch(peak_bytes, args.batch_start, limit)
    report["batch_search"] = search
    batch = search["batch"]
  batch = int(batch)
  report["batch"] = batch

  results, runners = {}, {}
  for mode in modes:
    builder = train_step_lib.StepBuilder.from_config(mode_config(base, mode, batch, overrides))
    traced = builder.trace()
    model_flops, _ = builder.flops(traced)  # as the trainer logs: model FLOPs, all devices
    compiled = builder.compile(traced)
    num_devices = builder.mesh.size
    results[mode] = {
        "flops_per_step": model_flops.flops,
        "flops_per_step_per_device": model_flops.flops / num_devices,
        "flops_note": ("exact: model FLOPs of matmuls and convolutions, every iteration "
                       "counted" if model_flops.exact else
                       "lower bound: a while loop's body (the teacher loop) counted once"),
        "memory_bytes_per_device": memory_bytes(compiled)}
    if args.compile_only:
      continue
    holder = list(random_inputs(builder))

    def step(compiled=compiled, holder=holder):
      holder[0], metrics = compiled(*holder)
      jax.block_until_ready((holder[0], metrics))

    runners[mode] = step
  report["model"] = builder.config.model.to_dict()
  report["params"] = models.param_count(builder.model)
  if args.compile_only:
    report["modes"] = results
    return report

  report["peak"] = common.peak_flops(args.matmul_size, args.repeats)
  peak = report["peak"]["flops_per_s"]
  times = common.interleaved_times(runners, args.repeats, args.warmup)
  for mode in modes:
    wall, cpu = common.summarize(times[mode]["wall"]), common.summarize(times[mode]["cpu"])
    r = results[mode]
    r.update(step_seconds=wall["median"], step_seconds_min=wall["min"],
             step_cpu_seconds=cpu["median"], images_per_s=batch / wall["median"],
             flops_per_s_per_device=r["flops_per_step_per_device"] / wall["median"])
    r["mfu"] = r["flops_per_s_per_device"] / peak
  report["timing"] = {"repeats": args.repeats, "warmup": args.warmup,
                      "order": "modes alternate within each repetition; medians"}
  report["modes"] = results
  if "diffusion" in results:
    report["ratios"] = {f"{m}_over_diffusion": ratio(results, m)
                        for m in modes if m != "diffusion"}
  return report


def parse_args(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--config", default="configs/digits_cd.py",
                      help="experiment config file[:arg]; only loss.mode changes per mode")
  parser.add_argument("--preset", default=None,
                      help="model preset override, at the data shape it was built for")
  parser.add_argument("--batch", default="128", help="global batch, or 'max' (module doc)")
  parser.add_argument("--batch_start", type=int, default=8, help="first batch of --batch=max")
  parser.add_argument("--memory_limit_gb", type=float, default=None)
  parser.add_argument("--dtype", default=None, help="model dtype override, e.g. bfloat16")
  parser.add_argument("--model", action="append", default=[], metavar="KEY=VALUE",
                      help="model override, repeatable: remat=True, attention_impl=cudnn")
  parser.add_argument("--mesh", default=None, help="DATA,FSDP (default: the config's)")
  parser.add_argument("--unroll", action="store_true", help="unroll the mid stack")
  parser.add_argument("--modes", default="diffusion,ct,cd,direct")
  parser.add_argument("--repeats", type=int, default=10)
  parser.add_argument("--warmup", type=int, default=2)
  parser.add_argument("--matmul_size", type=int, default=2048)
  parser.add_argument("--compile_only", action="store_true",
                      help="FLOPs and memory only, no timing (ImageNet configs on a CPU)")
  parser.add_argument("--out", default=None, help="also write the JSON here")
  args = parser.parse_args(argv)
  common.check_choices(parser, "modes", args.modes, MODES)
  return args


main = common.main_for(parse_args, run)


if __name__ == "__main__":
  main()
