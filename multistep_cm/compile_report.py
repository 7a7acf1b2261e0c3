"""Compiles the full-size train step for a TPU slice on this host: memory and FLOPs per chip.

    python -m multistep_cm.compile_report --config=configs/imagenet128_cd.py:size=large \
        --topology=v5e-256 [--steps_per_sec=1.8] [--json=report.json] [--config.KEY=VALUE]

Exit codes: 0 fits, 1 does not fit the chip's HBM, 2 a bad flag, config or topology (one
line `compile_report: error: ...`, before anything compiles), 6 a `--json` file that
cannot be written (found before compiling).

No TPU is needed: libtpu (`pip install -e '.[tpu]'`) compiles for a described slice
(`jax.experimental.topologies`) while JAX runs on the CPU, so an out-of-memory step
shows here before a pod is rented. `--topology=cpu` compiles for this host's devices
instead (no libtpu; what the tests use). The step is the trainer's own
(`train_step.StepBuilder`): same sharding rules, donation, remat and dtype settings.

Printed per chip:
  * arguments: train state (parameters, Adam moments, EMA), teacher parameters (cd and
    direct), the batch; from the shapes and shardings, and XLA's total;
  * XLA's temporaries, outputs, the outputs aliased to donated arguments (the new state
    reuses the old state's buffers), and the program itself;
  * total = arguments + temporaries + outputs - aliased + program, against the chip's HBM
    (`hardware.chip_spec`). XLA's TPU compiler may also refuse a step outright when its
    temporaries exceed the HBM it can use (15.75 GiB of a 16 GiB v5e chip): reported as
    not fitting, with the bytes from XLA's message;
  * FLOPs per step (below);
  * the MFU implied by a training speed: `--steps_per_sec`, by default the paper's
    (docs/maths.md §7.3, measured on 64 v5e chips for small models and 256 for large ones).

FLOPs are counted on the step's jaxpr (`runtime/flops.py`, the counter behind the trainer's
logged MFU too: XLA's cost analysis counts the scanned mid stack's body once, 1 of 16
blocks); XLA's own figure is shown beside them:
  * model FLOPs: the step's maths, traced with `remat` off; the numerator of MFU, as
    usual, so recomputation is not counted as useful work;
  * hardware FLOPs: with the configured remat, recomputed forwards included (HFU).
"""
import json
import math
import os
import re
import sys
import time
from typing import Any

from absl import app
from absl import flags
import jax
from jax.experimental import topologies
import ml_collections
from ml_collections import config_flags

from multistep_cm.config import checks as config_checks
from multistep_cm.config import plan as plan_lib
from multistep_cm.runtime import flops
from multistep_cm.runtime import hardware
from multistep_cm.sampling import inputs
from multistep_cm.training import step as train_step

FLAGS = flags.FLAGS

# §7.3: measured training speed (steps/s) on TPU v5e, batch 2048; small models on
# 64 chips, large ones and T2I (CD only) on 256.
PAPER_STEPS_PER_SEC = {
    ("imagenet64_small", "ct"): 2.7, ("imagenet64_small", "cd"): 2.5,
    ("imagenet128_small", "ct"): 2.2, ("imagenet128_small", "cd"): 1.7,
    ("imagenet64_large", "ct"): 2.9, ("imagenet64_large", "cd"): 2.5,
    ("imagenet128_large", "ct"): 2.2, ("imagenet128_large", "cd"): 1.8,
    ("t2i_512", "cd"): 0.71,
}
PAPER_CHIPS = {"imagenet64_small": 64, "imagenet128_small": 64, "imagenet64_large": 256,
               "imagenet128_large": 256, "t2i_512": 256}

# Chips -> the 2D torus of a v5e / v6e slice (Cloud TPU's accelerator types).
_SLICE_SHAPES = {1: "1x1", 4: "2x2", 8: "2x4", 16: "4x4", 32: "4x8", 64: "8x8",
                 128: "8x16", 256: "16x16"}


class TopologyError(ValueError):
  """A topology this host cannot describe (unknown name, or libtpu missing)."""


def _network_name(config) -> str:
  """The trained network's name: the model preset, or a module trained as its own student
  (`teacher.student='teacher'`) by its factory (e.g. 'dit_xl_2_bf16_remat')."""
  t = config.teacher
  if t.kind == "module" and t.student == "teacher":
    return t.module.rsplit(":", 1)[-1]
  return config.model.preset


def topology_name(name: str) -> str:
  """'v5e-64' / 'v5litepod-64' -> libtpu's 'v5e:8x8'; names with ':' pass through."""
  if ":" in name:
    return name
  match = re.fullmatch(r"(v5e|v5litepod|v6e)-(\d+)", name)
  if not match or int(match.group(2)) not in _SLICE_SHAPES:
    raise TopologyError(f"--topology={name!r}: expected v5e-N or v6e-N with N in "
                        f"{sorted(_SLICE_SHAPES)}, a libtpu name like v5e:8x8, or cpu")
  generation = "v6e" if match.group(1) == "v6e" else "v5e"
  return f"{generation}:{_SLICE_SHAPES[int(match.group(2))]}"


def topology_devices(name: str):
  """The (compile-only, for TPU) devices of a topology, and its libtpu name."""
  if name == "cpu":
    return jax.devices(), "cpu"
  resolved = topology_name(name)
  # A compile-only client never opens a TPU; these keep libtpu from waiting on the
  # (absent) TPU VM metadata and let another process hold libtpu at the same time.
  os.environ.setdefault("TPU_SKIP_MDS_QUERY", "1")
  os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
  try:
    topology = topologies.get_topology_desc(topology_name=resolved, platform="tpu")
  except (RuntimeError, ValueError) as e:  # JaxRuntimeError is a RuntimeError
    raise TopologyError(f"cannot describe TPU topology {resolved!r} ({str(e).splitlines()[0]}); "
                        "compiling for a TPU needs libtpu: pip install -e '.[tpu]'") from e
  return list(topology.devices), resolved


# --- the report --------------------------------------------------------------------------------


def _shard_bytes(tree) -> int:
  """Bytes per device of a tree of sharded ShapeDtypeStructs (the largest shard)."""
  total = 0
  for leaf in jax.tree.leaves(tree):
    shape = leaf.sharding.shard_shape(leaf.shape) if leaf.sharding is not None else leaf.shape
    total += math.prod(shape) * leaf.dtype.itemsize
  return total


def _oom_bytes(message: str) -> dict[str, float]:
  """XLA TPU's out-of-memory message -> {'required': bytes, 'available': bytes}."""
  found = re.search(r"temporaries \(([\d.]+)([KMGT])\) exceeds available HBM \(([\d.]+)([KMGT])\)",
                    message)
  if not found:
    return {}
  unit = {"K": 2**10, "M": 2**20, "G": 2**30, "T": 2**40}
  return {"required": float(found.group(1)) * unit[found.group(2)],
          "available": float(found.group(3)) * unit[found.group(4)]}


def build_report(config, topology: str = "cpu", steps_per_sec: float | None = None
                 ) -> dict[str, Any]:
  """Compiles the step of `config` for `topology` and returns the report as a dict.

  Raises:
    config_checks.ConfigError: the config does not fit the topology (mesh, batch).
  """

  devices, resolved = topology_devices(topology)
  num_chips = len(devices)
  num_hosts = len({d.process_index for d in devices})
  config = ml_collections.ConfigDict(config.to_dict())  # a copy: the teacher path is set
  if (plan_lib.RunPlan.from_config(config).objective.needs_teacher
      and not config.teacher_checkpoint):
    config.teacher_checkpoint = "(not loaded: compile report)"  # only its shapes are used
  config_checks.validate(config, num_devices=num_chips, num_processes=num_hosts)
  plan = plan_lib.RunPlan.from_config(config)
  config, mode = plan.config, plan.objective.value
  kind = devices[0].device_kind
  chip = hardware.chip_spec(kind)

  t0 = time.time()
  builder = train_step.StepBuilder(plan, devices=devices)
  traced = builder.trace()
  model_flops, hardware_flops = builder.flops(traced)
  model = config.model.to_dict()
  lowered = builder.lower(traced)
  t_lower = time.time() - t0

  state = builder.layout.abstract
  args = {
      "params": _shard_bytes(state.params), "opt_state": _shard_bytes(state.opt_state),
      "ema": _shard_bytes(state.ema),
      "teacher": _shard_bytes(builder.teacher_abstract) if builder.teacher_abstract else 0,
      "batch": _shard_bytes(builder.abstract_batch),
      "counters": _shard_bytes(state.counters()),
  }
  report = {
      "config": _network_name(config), "mode": mode, "batch_size": config.batch_size,
      "topology": resolved, "chips": num_chips, "hosts": num_hosts, "device_kind": kind,
      "mesh": dict(builder.mesh.shape),
      "model": {k: model[k] for k in ("dtype", "remat", "remat_policy", "scan_blocks")
                if k in model},
      "hbm_bytes": chip[2] if chip else None, "peak_flops": chip[1] if chip else None,
      "args_bytes": args, "lower_s": t_lower,
      "model_flops_per_chip": model_flops.flops / num_chips,
      "hardware_flops_per_chip": hardware_flops.flops / num_chips,
      "flops_exact": model_flops.exact and hardware_flops.exact,
  }

  t0 = time.time()
  try:
    compiled = lowered.compile()
  except jax.errors.JaxRuntimeError as e:
    if "RESOURCE_EXHAUSTED" not in str(e):
      raise
    report.update(compile_s=time.time() - t0, fits=False, xla_oom=_oom_bytes(str(e)),
                  error=str(e).splitlines()[0][:500])
  else:
    report["compile_s"] = time.time() - t0
    mem = compiled.memory_analysis()
    xla = {"argument": mem.argument_size_in_bytes, "output": mem.output_size_in_bytes,
           "alias": mem.alias_size_in_bytes, "temp": mem.temp_size_in_bytes,
           "program": mem.generated_code_size_in_bytes}
    total = xla["argument"] + xla["temp"] + xla["output"] - xla["alias"] + xla["program"]
    report.update(xla_bytes=xla, total_bytes=total,
                  fits=None if not chip else total <= chip[2],
                  xla_flops_per_chip=flops.xla_flops(compiled))

  # The paper's speeds are of its UViTs: a module trained as its own student has none.
  paper_key = (_network_name(config), mode)
  speed_chips = num_chips
  if steps_per_sec is None and paper_key in PAPER_STEPS_PER_SEC:
    steps_per_sec = PAPER_STEPS_PER_SEC[paper_key]
    speed_chips = PAPER_CHIPS[paper_key[0]]
    report["steps_per_sec_source"] = f"paper (§7.3), {speed_chips} chips"
  elif steps_per_sec is not None:
    report["steps_per_sec_source"] = f"--steps_per_sec, {num_chips} chips"
  report["steps_per_sec"] = steps_per_sec
  if steps_per_sec and chip:
    # FLOPs of the whole step are the same on any slice; the speed holds for its chips.
    per_chip_s = steps_per_sec * num_chips / speed_chips
    report["mfu"] = report["model_flops_per_chip"] * per_chip_s / chip[1]
    report["hfu"] = report["hardware_flops_per_chip"] * per_chip_s / chip[1]
  return report


def format_report(r: dict[str, Any]) -> str:
  """The report as an aligned, human-readable table."""
  def gib(b):
    for unit, scale in (("GiB", 2**30), ("MiB", 2**20)):
      if abs(b) >= scale / 10:
        return f"{b / scale:8.3f} {unit}"
    return f"{b / 2**10:8.3f} KiB"
  lines = [f"{r['config']} {r['mode']}, batch {r['batch_size']} on {r['topology']} "
           f"({r['chips']} x {r['device_kind']}, {r['hosts']} hosts), mesh {r['mesh']}",
           f"model: {r['model']}", "per chip:"]
  for key, value in r["args_bytes"].items():
    lines.append(f"  args/{key:<18}{gib(value)}")
  if "xla_bytes" in r:
    x = r["xla_bytes"]
    lines += [f"  {'arguments (XLA)':<23}{gib(x['argument'])}",
              f"  {'temporaries':<23}{gib(x['temp'])}",
              f"  {'outputs':<23}{gib(x['output'])}",
              f"  {'aliased (donated)':<23}{gib(-x['alias'])}",
              f"  {'program':<23}{gib(x['program'])}",
              f"  {'total':<23}{gib(r['total_bytes'])}"
              + (f"  of {r['hbm_bytes'] / 2**30:.2f} GiB HBM: "
                 f"{'fits' if r['fits'] else 'DOES NOT FIT'}" if r["hbm_bytes"] else "")]
  else:
    oom = r.get("xla_oom") or {}
    need = (f": temporaries {oom['required'] / 2**30:.2f} GiB > {oom['available'] / 2**30:.2f}"
            " GiB usable" if oom else "")
    lines.append(f"  DOES NOT FIT (XLA refused to compile{need})")
  exact = "" if r["flops_exact"] else " (a while loop counted once: a lower bound)"
  lines += [f"  {'model FLOPs/step':<23}{r['model_flops_per_chip']:.4g}{exact}",
            f"  {'hardware FLOPs/step':<23}{r['hardware_flops_per_chip']:.4g}"
            + (" (with remat's recomputation)" if r["model"].get("remat") else "")]
  if "xla_flops_per_chip" in r:
    lines.append(f"  {'XLA FLOPs/step':<23}{r['xla_flops_per_chip']:.4g} (scan bodies once)")
  if r.get("mfu") is not None:
    lines.append(f"  {'MFU':<23}{100 * r['mfu']:.1f}% (HFU {100 * r['hfu']:.1f}%) at "
                 f"{r['steps_per_sec']} steps/s ({r['steps_per_sec_source']})")
  lines.append(f"lower {r['lower_s']:.1f}s, compile {r.get('compile_s', 0):.1f}s")
  return "\n".join(lines)


def define_flags():
  """The command's flags; defined when run as a command only, so that importing this module
  (tests, notebooks) leaves absl's global flags alone (e.g. toy.py also defines --json).
  Returns the config flag's holder."""
  config = config_flags.DEFINE_config_file("config", None, "Experiment config file.",
                                           lock_config=True)
  flags.DEFINE_string(
      "topology", "v5e-256", "TPU slice to compile for: v5e-N / v6e-N (N chips), "
      "v5litepod-N, a libtpu topology name such as v5e:16x16, or 'cpu' for this host's "
      "devices.")
  flags.DEFINE_float(
      "steps_per_sec", None, "Training speed for the implied MFU; default: the paper's "
      "(§7.3) for the config's model and mode, on the paper's chip count.")
  flags.DEFINE_string("json", None, "Also write the report as JSON to this file.")
  flags.mark_flags_as_required(["config"])
  return config


def main(argv):
  del argv  # flags only (inputs.flags_parser)
  with inputs.refusals("compile_report"):  # every input before anything compiles
    if FLAGS.steps_per_sec is not None and not FLAGS.steps_per_sec > 0:
      raise inputs.InputError(f"--steps_per_sec must be positive, got {FLAGS.steps_per_sec}")
    if "stages" in FLAGS.config:
      raise inputs.InputError(f"--config is a staged run (stages "
                              f"{list(FLAGS.config.stage_order)}); give a single run's "
                              "config file (the stage to compile)")
    inputs.check_output_file(FLAGS.json, "--json")
  if not os.environ.get("JAX_PLATFORMS"):
    # The step is compiled for the topology's devices: JAX itself runs on the CPU and
    # must not claim an accelerator this host may have (e.g. a TPU VM in use).
    jax.config.update("jax_platforms", "cpu")
  try:
    report = build_report(FLAGS.config, FLAGS.topology, FLAGS.steps_per_sec)
  except (config_checks.ConfigError, TopologyError) as e:
    inputs.fail("compile_report", inputs.BAD_FLAG, str(e))
  print(format_report(report))
  if FLAGS.json:
    with open(FLAGS.json, "w") as fh:
      json.dump(report, fh, indent=2, sort_keys=True)
  if report["fits"] is False:
    sys.exit(1)


if __name__ == "__main__":
  app.run(main, flags_parser=inputs.flags_parser("compile_report", define_flags()))
