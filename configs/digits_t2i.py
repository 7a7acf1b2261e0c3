"""The embedded text-to-image demo on a CPU: captioned digits -> text teacher -> CD students.

    python -m multistep_cm.main --config=configs/digits_t2i.py --workdir=/tmp/mcm_t2i
    python -m multistep_cm.t2i_demo --workdir=/tmp/mcm_t2i

Stage `teacher` trains a text-conditioned diffusion model (`digits8_text`, conditioning
dropout 0.1 so classifier-free guidance works) on the digits with generated captions
("a thick slanted seven": data/captions.py, encoded by the fixed encoder the project
ships). Stages `cd_w0`, `cd_w1`, `cd_w3` then distil it into 4-step Multistep CD
students, each from the teacher guided at w = 0, 1, 3 (x_var from the conditional output,
§5.5). `t2i_demo` samples teacher and students on held-out prompts and writes docs/results.md's
prompt-following table and a grid with the prompts beside the rows.

Variants: steps=S (student steps), guidance=0/1/3 (the students' w, '/'-separated), teacher_steps,
student_steps_train (optimizer steps per student stage). Batch 64 throughout; about 25
minutes for the teacher and 4-8 for each student on the 2-core CPU (docs/results.md).
"""
import ml_collections

from multistep_cm.config import base as config_base


def student_stage(w: float) -> str:
  return f"cd_w{w:g}".replace(".", "p")


def get_config(arg=None):
  a = config_base.parse_arg(arg, steps=4, guidance="0/1/3", teacher_steps=4000,
                            student_steps_train=800)
  scales = [float(w) for w in str(a.guidance).split("/") if w]
  c = ml_collections.ConfigDict()
  c.stages = ml_collections.ConfigDict()
  c.stages.teacher = config_base.captioned_digits_config("diffusion")
  c.stages.teacher.num_train_steps = a.teacher_steps
  order = ["teacher"]
  for w in scales:
    name = student_stage(w)
    stage = config_base.captioned_digits_config("cd", a.steps, w, teacher="stage:teacher")
    stage.num_train_steps = a.student_steps_train
    stage.loss.anneal_steps = a.student_steps_train // 2
    c.stages[name] = stage
    order.append(name)
  for name in order:
    c.stages[name].batch_size = 64
    c.stages[name].checkpoint_every_steps = 1000
    c.stages[name].sample_every_steps = 1000
  c.stage_order = tuple(order)
  return c
