"""The digits study behind the README table: one teacher, CD and CT students at S = 1, 2, 4, 8.

    python -m multistep_cm.main --config=configs/digits_study.py --workdir=/tmp/digits_study
    python -m multistep_cm.evaluate --workdir=/tmp/digits_study --steps=1,2,4,8,16,64,512

Stage `teacher` is the digits diffusion model; stages `cd<S>` and `ct<S>` start from its
EMA weights (as the paper's students start from the teacher, §7.1), and the CD stages
distil it. Every stage trains for the same number of steps. Variants: size=8|16,
steps=1/2/4/8 (the student step counts, '/'-separated), student_train_steps=N,
anystep=segment_start|steps (any-step training: adds stage `cdany`, one CD model for all the step
counts, conditioned on its segment layout and trained as long as the separate CD stages
together; `evaluate` samples it at each count), anystep_probs=0.7/0.1/0.1/0.1 (its
step counts' shares of the batch, in `steps` order), teacher=PATH (a trained diffusion
run instead of stage `teacher`), modes=cd/ct (which separate students to train; none:
only the any-step one).
"""
import ml_collections

from multistep_cm.config import base as config_base


def get_config(arg=None):
  a = config_base.parse_arg(arg, size=8, steps="1/2/4/8", student_train_steps=3000, anystep="",
                            anystep_probs="", teacher="", modes="cd/ct")
  teacher = a.teacher or "stage:teacher"
  c = ml_collections.ConfigDict()
  c.stages = ml_collections.ConfigDict()
  order = []
  if not a.teacher:
    c.stages.teacher = config_base.digits_config("diffusion", image_size=a.size)
    order.append("teacher")
  for mode in (m for m in a.modes.split("/") if m and m != "none"):
    for s in (int(v) for v in a.steps.split("/")):
      stage = config_base.digits_config(mode, s, a.size, teacher=teacher)
      stage.num_train_steps = a.student_train_steps
      stage.loss.anneal_steps = a.student_train_steps // 2
      c.stages[f"{mode}{s}"] = stage
      order.append(f"{mode}{s}")
  if a.anystep:
    counts = [int(v) for v in a.steps.split("/")]
    probs = [float(v) for v in a.anystep_probs.split("/")] if a.anystep_probs else ()
    stage = config_base.set_anystep(
        config_base.digits_config("cd", max(counts), a.size, teacher=teacher),
        counts, a.anystep, probs)
    stage.num_train_steps = a.student_train_steps * len(counts)
    stage.loss.anneal_steps = stage.num_train_steps // 2
    c.stages.cdany = stage
    order.append("cdany")
  c.stage_order = tuple(order)
  return c
