"""FLOPs of a traced program, counted on its jaxpr: matmuls and convolutions.

The one FLOP counter of the package: the trainer's logged MFU
(training/step.py: `StepBuilder.flops`), the compile report and the model summary all count
with `count_flops`. `xla_flops` reads XLA's own figure, which the compile report and
the tests show beside it for comparison only.

Why not XLA's cost analysis: it counts the body of a `while` loop once, whatever its
trip count, and the UViT's mid stack is a scan of 16 blocks (`scan_blocks`), so the
compiled step of a scanned model reports 15 blocks too few
(tests/system/test_compile_report.py shows it). Here a scan's body counts `length` times.

What is counted: `2 * M * N * K` per `dot_general`, and per convolution 2 x batch x
output channels x input channels per group x the (output position, kernel tap) pairs
that read the image rather than its padding (as XLA counts them). Element-wise work
(norms, activations, the optimiser) is not counted: the usual numerator of MFU
(e.g. PaLM, App. B). A traced gradient with `remat` holds the recomputed forwards too,
so the count of a rematerialised step is its hardware FLOPs; trace the step without
remat for the model FLOPs.
"""
import dataclasses
import math

from jax.extend import core
import numpy as np


@dataclasses.dataclass
class FlopCount:
  flops: float = 0.0
  exact: bool = True  # False once a while loop (unknown trip count) was counted once

  def add(self, other: "FlopCount", times: float = 1.0):
    self.flops += times * other.flops
    self.exact &= other.exact


def _real_taps(size: int, window: int, stride: int, pad: tuple[int, int], lhs_dilation: int,
               rhs_dilation: int) -> int:
  """(output position, kernel tap) pairs of one spatial axis that read a real input element."""
  dilated = (size - 1) * lhs_dilation + 1
  out = (dilated + pad[0] + pad[1] - (window - 1) * rhs_dilation - 1) // stride + 1
  pos = (np.arange(max(out, 0))[:, None] * stride + np.arange(window)[None, :] * rhs_dilation
         - pad[0])
  real = (pos >= 0) & (pos < dilated) & (pos % lhs_dilation == 0)
  return int(real.sum())


def _conv_flops(eqn) -> float:
  lhs, rhs = (v.aval for v in eqn.invars[:2])
  p = eqn.params
  dn = p["dimension_numbers"]
  pairs = 1
  for i, (ls, rs) in enumerate(zip(dn.lhs_spec[2:], dn.rhs_spec[2:])):
    pairs *= _real_taps(lhs.shape[ls], rhs.shape[rs], p["window_strides"][i], p["padding"][i],
                        p["lhs_dilation"][i], p["rhs_dilation"][i])
  out = eqn.outvars[0].aval
  in_features_per_group = rhs.shape[dn.rhs_spec[1]]
  return (2.0 * out.shape[dn.out_spec[0]] * out.shape[dn.out_spec[1]] * in_features_per_group
          * pairs)


def _dot_flops(eqn) -> float:
  lhs = eqn.invars[0].aval
  (lhs_contract, _), _ = eqn.params["dimension_numbers"]
  return 2.0 * math.prod(eqn.outvars[0].aval.shape) * math.prod(
      lhs.shape[d] for d in lhs_contract)


def _sub_jaxprs(value):
  if isinstance(value, core.ClosedJaxpr):
    yield value.jaxpr
  elif isinstance(value, core.Jaxpr):
    yield value
  elif isinstance(value, (tuple, list)):
    for v in value:
      yield from _sub_jaxprs(v)


def count_flops(jaxpr) -> FlopCount:
  """Matmul and convolution FLOPs of a (closed) jaxpr, scan bodies counted `length` times.

  A `while` loop's trip count is unknown here: its body counts once and the result
  is marked inexact (a lower bound). Of a `cond`, the dearest branch counts.
  """
  jaxpr = getattr(jaxpr, "jaxpr", jaxpr)
  count = FlopCount()
  for eqn in jaxpr.eqns:
    name = eqn.primitive.name
    if name == "dot_general":
      count.flops += _dot_flops(eqn)
    elif name == "conv_general_dilated":
      count.flops += _conv_flops(eqn)
    elif name == "scan":
      count.add(count_flops(eqn.params["jaxpr"]), eqn.params["length"])
    elif name == "cond":
      count.add(max((count_flops(b) for b in eqn.params["branches"]), key=lambda c: c.flops))
    elif name == "while":
      count.add(count_flops(eqn.params["body_jaxpr"]))
      count.add(count_flops(eqn.params["cond_jaxpr"]))
      count.exact = False
    else:  # jit, remat, custom_jvp/vjp calls, shard_map: their bodies run once
      for value in eqn.params.values():
        for sub in _sub_jaxprs(value):
          count.add(count_flops(sub))
  return count


def xla_flops(compiled_or_lowered) -> float:
  """XLA's cost-analysis FLOPs: per device of a compiled SPMD program, global of a lowered one.

  For comparison only (see the module docstring): a loop body counts once, and
  element-wise work counts too.
  """
  cost = compiled_or_lowered.cost_analysis()
  if isinstance(cost, (list, tuple)):
    cost = cost[0]
  return float(cost.get("flops", 0.0)) if cost else 0.0
