"""The toy Gaussian mixture through the main trainer: Progressive Distillation, as stages.

    python -m multistep_cm.main --config=configs/mixture_pd.py:teacher=/tmp/mcm_mix/teacher \
        --workdir=/tmp/mcm_mix/pd

Stages pd<N> for N = start/2, ..., end, each distilling the stage before it (the first:
the diffusion MLP `teacher`; without it, a stage `teacher` trains one first). The toy
experiment with the exact denoiser as the first teacher is
`python -m multistep_cm.toy --modes=pd,cd --equal_compute` (docs/results.md).

Variants: teacher=PATH, start=64, end=1, halving_steps=500, solver=addim|ddim, dim=8.
"""
from multistep_cm.config import base as config_base


def get_config(arg=None):
  a = config_base.parse_arg(arg, teacher="", start=64, end=1, halving_steps=500,
                            solver="addim", dim=8)

  def pd_student(n, previous):
    stage = config_base.mixture_config("pd", n, previous, a.dim)
    stage.loss.teacher_solver = a.solver
    return stage

  c = config_base.pd_stages(pd_student, a.start, a.end, a.teacher or "stage:teacher",
                            a.halving_steps)
  if not a.teacher:
    c.stages.teacher = config_base.mixture_config("diffusion", data_dim=a.dim)
    c.stage_order = ("teacher",) + tuple(c.stage_order)
  return c
