"""Guidance as an input on the digits: one student told w against fixed-w students.

    python -m multistep_cm.main \
        --config=configs/digits_guidance.py:teacher=/tmp/mcm_digits/teacher \
        --workdir=/tmp/digits_guidance
    python -m multistep_cm.evaluate --workdir=/tmp/digits_guidance --steps=4 \
        --guidance=0,1,3 --num_samples=1000

Stages `cd<S>_w<w>` for each w of `ws`: S-step CD students of the diffusion run `teacher`,
whose teacher step is classifier-free guided at that fixed w (the student starts from the
teacher's weights, §7.1), each trained `student_train_steps`. Stage `cd<S>_range`: one
student trained on w ~ U[w_min, w_max] (`loss.guidance_range`, the range from the
smallest to the largest of `ws`) and told w, trained as long as the fixed-w students
together (equal total compute); `evaluate --guidance` samples it at each w. Without
`teacher`, a stage `teacher` trains the diffusion model first.

Variants: size=8|16, teacher=PATH, steps=S, ws=0/1/3 ('/'-separated),
student_train_steps=N (each fixed-w student; teacher steps annealed 64 -> 1280 over the
first half of every stage), batch=B.
"""
import ml_collections

from multistep_cm.config import base as config_base


def get_config(arg=None):
  a = config_base.parse_arg(arg, size=8, teacher="", steps=4, ws="0/1/3",
                            student_train_steps=600, batch=64)
  ws = [float(v) for v in a.ws.split("/")]
  stages = {}
  if not a.teacher:  # trained here first
    stages["teacher"] = config_base.digits_config("diffusion", image_size=a.size)

  def student(num_train_steps):
    stage = config_base.digits_config("cd", a.steps, a.size,
                                      teacher=a.teacher or "stage:teacher")
    stage.batch_size = a.batch
    stage.num_train_steps = num_train_steps
    stage.loss.anneal_steps = num_train_steps // 2
    return stage

  for w in ws:
    stage = student(a.student_train_steps)
    stage.loss.guidance_scale = w
    stages[f"cd{a.steps}_w{w:g}".replace(".", "p")] = stage
  stage = student(a.student_train_steps * len(ws))  # equal total compute
  stage.loss.guidance_range = (min(ws), max(ws))
  stage.model.guidance_cond = True
  stages[f"cd{a.steps}_range"] = stage
  return ml_collections.ConfigDict({"stages": stages, "stage_order": tuple(stages)})
