"""The paper's Table 3 and Table 4 on the digits as learning curves: MCM-CD students and a PD chain
from one trained teacher, each evaluated during training (issue 31; docs/results.md).

    python -m multistep_cm.main --config=configs/digits_table3.py:teacher=/tmp/mcm_digits/teacher,seed=0 \
        --workdir=/tmp/table3/seed0
    python -m multistep_cm.evaluation.learning_curves --runs=/tmp/table3/seed0,/tmp/table3/seed1,/tmp/table3/seed2 \
        --out=/tmp/table3/fd

Stages `cd<S>` (one per student step count S) train `budget` steps each and score themselves
every `eval_every` steps (FD to the held-out split, `num_samples` samples, and the ODE error
against the teacher's `ode_steps`-step DDIM solve): the CD learning curve. Stages `pd<N>` are the
Progressive Distillation chain from the teacher's `start` aDDIM steps down to `end`, `halving`
steps per halving, each student scored once at its end: the S-step PD student's point on the
same axis is at (log2(start/S)) * halving optimizer steps. Every stage runs at `batch` and
seed `seed` (initialisation of nothing new, but the noise, times and data order).

Without `teacher`, a stage `teacher` trains the main job's digits teacher first (as
configs/digits_pipeline.py: 4000 steps at batch 64).

Variants: teacher=PATH (a trained digits diffusion run), seed=0, steps=1/2/4/8,
budget=4000, eval_every=500, num_samples=2000, solver=addim|ddim (CD's teacher step,
Table 4), halving=500 (0: no PD chain), start=16, end=1, batch=64, modes=cd/pd,
ode_steps=64 (0: no ODE error).
"""
import ml_collections

from multistep_cm.config import base as config_base


def get_config(arg=None):
  a = config_base.parse_arg(arg, teacher="", seed=0, steps="1/2/4/8", budget=4000,
                            eval_every=500, num_samples=2000, solver="addim", halving=500,
                            start=16, end=1, batch=64, modes="cd/pd", ode_steps=64)
  teacher = a.teacher or "stage:teacher"
  modes = [m for m in a.modes.split("/") if m]
  unknown = sorted(set(modes) - {"cd", "pd"})
  if unknown:
    raise ValueError(f"digits_table3: modes={a.modes!r}: {unknown[0]!r} is not cd or pd")

  def scored(stage, every):
    stage.evals.every_steps = every
    stage.evals.num_samples = a.num_samples
    # The teacher's ODE solve of every sample is computed once per stage, at a cost of
    # about ode_steps * num_samples / (5 * batch) training steps: 0 turns it off.
    stage.evals.ode_error = bool(a.ode_steps)
    stage.evals.ode_steps = a.ode_steps or stage.evals.ode_steps
    return stage

  c = ml_collections.ConfigDict()
  c.stages = ml_collections.ConfigDict()
  order = []
  if not a.teacher:  # the main job's teacher (configs/digits_pipeline.py): 4000 steps at 64
    c.stages.teacher = config_base.digits_config("diffusion", image_size=8)
    c.stages.teacher.num_train_steps = 4000
    c.stages.teacher.checkpoint_every_steps = 1000
    order.append("teacher")
  if "pd" in modes and a.halving:
    def pd_student(n, previous):
      stage = config_base.digits_config("pd", n, 8, teacher=previous)
      stage.loss.teacher_solver = "addim"
      return scored(stage, a.halving)

    chain = config_base.pd_stages(pd_student, a.start, a.end, teacher, a.halving)
    for name in chain.stage_order:
      c.stages[name] = chain.stages[name]
    order += list(chain.stage_order)
  if "cd" in modes:
    for s in (int(v) for v in a.steps.split("/") if v):
      stage = scored(config_base.digits_config("cd", s, 8, teacher=teacher), a.eval_every)
      stage.num_train_steps = a.budget
      stage.loss.anneal_steps = a.budget // 2
      stage.loss.teacher_solver = a.solver
      stage.checkpoint_every_steps = a.budget
      c.stages[f"cd{s}"] = stage
      order.append(f"cd{s}")
  c.stage_order = tuple(order)
  for name in order:
    c.stages[name].batch_size = a.batch
    c.stages[name].seed = a.seed
    if name != "teacher":
      c.stages[name].sample_every_steps = 0
  return c
