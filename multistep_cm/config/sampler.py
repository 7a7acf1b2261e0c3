"""How samples are drawn, named: a Multistep CM's steps, or a diffusion sampler's settings.

A `SamplerSpec` is a value (frozen, comparable), so every report can say exactly what
produced its samples and a run's plan can say which sampler it trains and samples with
(config/plan.py: `RunPlan.sampler`); sampling/generation.py turns one into a sampler.
"""
import dataclasses

import numpy as np

from multistep_cm.diffusion import sampling

KINDS = ("mcm",) + sampling.SAMPLERS
X_VAR_RULES = ("analytic", "table")
_NAMES = {"ddim": "DDIM", "addim": "aDDIM", "euler": "Euler", "heun": "Heun"}


@dataclasses.dataclass(frozen=True)
class SamplerSpec:
  """`kind`: 'mcm' (Algorithm 2, `steps` = S), or a diffusion sampler of
  `sampling.SAMPLERS` (`steps` = K steps on the `spacing` grid; Heun costs 2K - 1 NFE)."""
  kind: str
  steps: int
  x_var: str = "analytic"  # aDDIM: 'analytic' (0.1 / (2 + SNR)) or 'table' (from data)
  guidance: float = 0.0
  boundaries: tuple[float, ...] | None = None  # MCM: segment boundaries (None: equal)
  step_index: int | None = None  # any-step students told their step count: its index
  spacing: str = "uniform"  # diffusion samplers: 'uniform' in t or 'karras'
  final_step: str | None = None  # aDDIM's last step (None: sampling.DEFAULT_FINAL_STEP)
  student: str = "Multistep CM"  # 'mcm': what the student is (Objective.student_name)
  # A guidance-conditioned student (trained on a range of w) is told `guidance`: one
  # forward per step instead of the classifier-free guidance pair.
  guidance_input: bool = False

  def __post_init__(self):
    if self.kind not in KINDS:
      raise ValueError(f"sampler must be one of {KINDS}, got {self.kind!r}")
    if self.steps < 1:
      raise ValueError(f"sampler steps must be >= 1, got {self.steps}")
    if self.x_var not in X_VAR_RULES:
      raise ValueError(f"x_var must be one of {X_VAR_RULES}, got {self.x_var!r}")
    if self.spacing not in sampling.SPACINGS:
      raise ValueError(f"spacing must be one of {sampling.SPACINGS}, got {self.spacing!r}")
    if self.kind == "mcm" and self.spacing != "uniform":
      raise ValueError("a Multistep CM samples on its segment boundaries; spacing applies to "
                       "diffusion samplers")
    if self.guidance_input and self.kind != "mcm":
      raise ValueError("only a Multistep CM student can be told its guidance scale")
    if self.final_step is not None and (self.kind != "addim"
                                        or self.final_step not in sampling.FINAL_STEPS):
      raise ValueError(f"final_step applies to aDDIM only and must be one of "
                       f"{sampling.FINAL_STEPS}, got {self.final_step!r} for {self.kind!r}")

  @property
  def nfe(self) -> int:
    """Network evaluations per sample (guidance runs both halves as one batch; a student
    told w runs one)."""
    return self.steps if self.kind == "mcm" else sampling.nfe(self.kind, self.steps)

  def describe(self) -> str:
    if self.kind == "mcm":
      text = f"{self.student}, {self.steps} step{'s' * (self.steps > 1)} (DDIM, Algorithm 2)"
      equal = tuple(k / self.steps for k in range(self.steps + 1))
      if self.boundaries is not None and not np.allclose(self.boundaries, equal):
        text += ", boundaries " + "/".join(f"{b:.3g}" for b in self.boundaries)
    else:
      text = f"{_NAMES[self.kind]}, {self.steps} step{'s' * (self.steps > 1)}"
      if self.spacing != "uniform":
        text += f", {self.spacing} spacing"
      if self.kind == "addim":
        text += f", x_var {'0.1/(2+SNR)' if self.x_var == 'analytic' else 'table from data'}"
        text += f", {self.final_step or sampling.DEFAULT_FINAL_STEP} last step"
    if self.guidance_input:
      text += f", told guidance w = {self.guidance:g}"
    elif self.guidance:
      text += f", guidance {self.guidance}"
    return text
