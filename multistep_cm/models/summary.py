"""Parameter count, per-stage shapes and FLOPs of a model, without allocating parameters.

    python -m multistep_cm.models.summary --preset imagenet64_small
    python -m multistep_cm.models.summary --config=tests/tiny_model_config.py

Everything is computed on abstract shapes: the count from `jax.eval_shape` of
`init`, the stage shapes from `jax.eval_shape` of `apply` collecting the sown
'intermediates', the FLOPs on the jaxpr of `apply` given `ShapeDtypeStruct`
parameters, by the package's one FLOP counter (runtime/flops.py: matmuls and convolutions,
every block of the scanned mid stack counted), the one behind the trainer's logged
MFU and the compile report. A bad flag or a config file that does not load is one line
`summary: error: ...` and exit 2.
"""
import argparse
import importlib.util
import sys
from typing import Any

import flax.linen as nn
import jax

from multistep_cm.models import presets
from multistep_cm.runtime import flops
from multistep_cm.sampling import inputs


def forward_flops(model: nn.Module, batch: int) -> float:
  """Matmul and convolution FLOPs of one forward pass at `batch` (flops.count_flops)."""
  params = nn.meta.unbox(presets.abstract_variables(model)["params"])
  apply = lambda p, *inputs: model.apply({"params": p}, *inputs, train=False)
  return flops.count_flops(jax.make_jaxpr(apply)(params, *presets.input_specs(model, batch))
                           ).flops


def stage_shapes(model: nn.Module, batch: int = 1) -> dict[str, tuple[int, ...]]:
  """Activation shape after every stage ('down0', ..., 'mid', ..., 'up0'), abstractly."""
  def run(key, *inputs):
    variables = model.init({"params": key}, *inputs)
    _, state = model.apply(variables, *inputs, mutable=["intermediates"])
    return state.get("intermediates", {})

  inter = jax.eval_shape(run, jax.random.key(0), *presets.input_specs(model, batch))
  shapes = {name.removesuffix("_out"): tuple(value[0].shape) for name, value in inter.items()}

  def network_order(stage: str):  # down0, down1, ..., mid, ..., up1, up0
    if stage == "mid":
      return (1, 0)
    level = int(stage.lstrip("downup"))
    return (0, level) if stage.startswith("down") else (2, -level)

  return {stage: shapes[stage] for stage in sorted(shapes, key=network_order)}


def summarize(model: nn.Module, batch: int = 8) -> dict[str, Any]:
  """Parameter count, stage shapes (batch 1) and forward FLOPs (batch 1, per example)."""
  flops_batch = forward_flops(model, batch)
  return {
      "params": presets.param_count(model),
      "input_shape": tuple(presets.input_specs(model, 1)[0].shape),
      "stage_shapes": stage_shapes(model),
      "flops_batch1": forward_flops(model, 1),
      "flops_per_example": flops_batch / batch,
      "flops_batch": batch,
  }


def format_summary(name: str, model: nn.Module, summary: dict[str, Any],
                   paper: float | None = None) -> str:
  """Human-readable lines for `summarize`'s result; `paper`: the published count."""
  lines = [f"model: {name} ({type(model).__name__}, dtype {jax.numpy.dtype(model.dtype).name})"]
  count = f"parameters: {summary['params']:,}"
  if paper:
    count += f" (paper {paper / 1e6:,.0f}M, {100 * (summary['params'] / paper - 1):+.1f}%)"
  lines.append(count)
  lines.append("activation shapes (batch 1):")
  lines.append(f"  {'input':<8} {summary['input_shape']}")
  for stage, shape in summary["stage_shapes"].items():
    lines.append(f"  {stage:<8} {shape}")
  lines.append(f"  {'output':<8} {summary['input_shape']}")
  lines.append(f"forward FLOPs: {summary['flops_batch1'] / 1e9:,.3f} GFLOP at batch 1, "
               f"{summary['flops_per_example'] / 1e9:,.3f} GFLOP per example at batch "
               f"{summary['flops_batch']}")
  return "\n".join(lines)


def load_config(path: str) -> Any:
  """Imports `path` (optionally `path:arg`) and returns its `get_config(arg)`."""
  path, _, arg = path.partition(":")
  spec = importlib.util.spec_from_file_location("_model_summary_config", path)
  if spec is None or spec.loader is None:
    raise ValueError(f"--config: cannot import {path!r}")
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config(arg) if arg else module.get_config()


def main(argv: list[str] | None = None) -> dict[str, Any]:
  """Parses `argv`, prints the summary and returns it."""
  parser = argparse.ArgumentParser(prog="summary", description=__doc__.splitlines()[0])
  parser.error = lambda message: inputs.fail("summary", inputs.BAD_FLAG, message)
  source = parser.add_mutually_exclusive_group(required=True)
  source.add_argument("--preset", choices=sorted(presets.PRESETS))
  source.add_argument("--config", help="experiment config file[:arg] with get_config()")
  parser.add_argument("--batch", type=int, default=8, help="batch for FLOPs per example")
  args = parser.parse_args(argv)
  if args.batch < 1:
    parser.error(f"--batch must be a positive integer, got {args.batch}")
  paper = None
  if args.preset:
    # The paper's count applies to the preset as published, not to a config's variant.
    name, model = args.preset, presets.get_model(args.preset)
    paper = presets.PAPER_PARAMS.get(name)
  else:
    try:
      config = load_config(args.config)
    except Exception as e:  # pylint: disable=broad-except
      # The user's config file: its own error, in one line.
      parser.error(f"--config={args.config}: {type(e).__name__}: {e}".splitlines()[0])
    if "stages" in config:
      parser.error(f"--config={args.config} is a staged run (stages {list(config.stage_order)}); "
                   "give a single run's config file, or --preset")
    name, model = f"{args.config} ({config.model.preset})", presets.get_model_for_config(config)
  summary = summarize(model, batch=args.batch)
  print(format_summary(name, model, summary, paper))
  return summary


if __name__ == "__main__":
  main(sys.argv[1:])
