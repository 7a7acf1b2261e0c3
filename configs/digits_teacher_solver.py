"""Embedded digits: CD with the aDDIM teacher step against the DDIM one (the paper's Table 4).

    python -m multistep_cm.main \
        --config=configs/digits_teacher_solver.py:teacher=/tmp/mcm_digits/teacher \
        --workdir=/tmp/digits_teacher_solver
    python -m multistep_cm.evaluate --workdir=/tmp/digits_teacher_solver --num_samples=1000

Stages `cd<S>_addim` and `cd<S>_ddim` for each student step count S: CD students, started
from and distilling the diffusion run `teacher` (§7.1), identical but for
`loss.teacher_solver` (the teacher's step of Algorithm 1, line 10: aDDIM with x_var from
the data, §5.5, or DDIM). Without `teacher`, a stage `teacher` trains the diffusion model
first (as configs/digits_study.py). The paper (Table 4, ImageNet64): aDDIM helps from
S = 4 up, DDIM is better at S = 1. docs/results.md: the measured digits table.

Variants: size=8|16, teacher=PATH, steps=1/2/4/8 (the student step counts,
'/'-separated), student_train_steps=N (each student; teacher steps annealed 64 -> 1280
over the first half), batch=B.
"""
import ml_collections

from multistep_cm.config import base as config_base


def get_config(arg=None):
  a = config_base.parse_arg(arg, size=8, teacher="", steps="1/2/4/8",
                            student_train_steps=3000, batch=128)
  teacher = a.teacher or "stage:teacher"
  c = ml_collections.ConfigDict()
  c.stages = ml_collections.ConfigDict()
  order = []
  if not a.teacher:
    c.stages.teacher = config_base.digits_config("diffusion", image_size=a.size)
    order.append("teacher")
  for s in (int(v) for v in a.steps.split("/")):
    for solver in ("addim", "ddim"):
      stage = config_base.digits_config("cd", s, a.size, teacher=teacher)
      stage.loss.teacher_solver = solver
      stage.batch_size = a.batch
      stage.num_train_steps = a.student_train_steps
      stage.loss.anneal_steps = a.student_train_steps // 2
      c.stages[f"cd{s}_{solver}"] = stage
      order.append(f"cd{s}_{solver}")
  c.stage_order = tuple(order)
  return c
