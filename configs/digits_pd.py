"""Embedded digits: Progressive Distillation (Salimans & Ho 2022), the paper's baseline, as stages.

    python -m multistep_cm.main --config=configs/digits_pd.py:teacher=/tmp/mcm_digits/teacher \
        --workdir=/tmp/mcm_digits_pd
    python -m multistep_cm.evaluate --workdir=/tmp/mcm_digits_pd

Stages pd<N> for N = start/2, ..., end: each N-step student learns to match two DDIM or
aDDIM steps of its 2N-step teacher with one (diffusion/losses.py, `pd_loss`), starting
from and distilling the stage before it (the first: the diffusion run `teacher`). Each
student samples with DDIM on its N uniform steps. Without `teacher`, a stage `teacher`
trains the diffusion model first (as configs/digits_pipeline.py).

Variants: size=8|16, teacher=PATH, start=64 (the teacher's steps in the first halving),
end=1 (the last student's steps), halving_steps=1000 (steps per halving),
solver=addim|ddim (the teacher's steps), compare=1/2/4/8: also MCM-CD students at those
step counts, each trained as many steps as the PD chain takes to reach that count
(experiment (b): PD vs CD at equal training compute; docs/results.md), batch=128 (every stage).
"""
import ml_collections

from multistep_cm.config import base as config_base


def get_config(arg=None):
  a = config_base.parse_arg(arg, size=8, teacher="", start=64, end=1, halving_steps=1000,
                            solver="addim", compare="", batch=128)
  teacher = a.teacher or "stage:teacher"

  def pd_student(n, previous):
    stage = config_base.digits_config("pd", n, a.size, teacher=previous)
    stage.loss.teacher_solver = a.solver
    return stage

  c = config_base.pd_stages(pd_student, a.start, a.end, teacher, a.halving_steps)
  order = list(c.stage_order)
  if not a.teacher:
    c.stages.teacher = config_base.digits_config("diffusion", image_size=a.size)
    order.insert(0, "teacher")
  for s in (int(v) for v in a.compare.split("/") if v):
    stage = config_base.digits_config("cd", s, a.size, teacher=teacher)
    stage.num_train_steps = config_base.pd_halvings(a.start, s) * a.halving_steps
    stage.loss.anneal_steps = stage.num_train_steps // 2
    c.stages[f"cd{s}"] = stage
    order.append(f"cd{s}")
  c.stage_order = tuple(order)
  for name in order:
    c.stages[name].batch_size = a.batch
  return c
