"""Your own images, end to end: a teacher, then a Multistep CM student (docs/own_images.md).

    python -m multistep_cm.data.prepare --images=my_images/ --name=shapes --data_dir=/data/tfds
    python -m multistep_cm.main --config=configs/folder_pipeline.py:name=shapes,data_dir=/data/tfds \\
        --workdir=/tmp/shapes

The image size, channels and classes are the prepared dataset's; the preset is the UViT
made for its size (config/base.py: folder_config). Stage `teacher` trains the diffusion
model, stage `cd4` (or `<mode><steps>`) distils it, starting from its weights.

Variants: name=NAME (required), data_dir=DIR, steps=S, mode=cd|ct, teacher_steps=N,
student_steps=N (training steps of each stage), batch=B.
"""
import ml_collections

from multistep_cm.config import base as config_base


def get_config(arg=None):
  a = config_base.parse_arg(arg, name="", data_dir="", steps=4, mode="cd", teacher_steps=4000,
                            student_steps=2000, batch=64)
  if not a.name:
    raise ValueError("name the prepared dataset: configs/folder_pipeline.py:name=NAME")
  student = f"{a.mode}{a.steps}"
  c = ml_collections.ConfigDict()
  c.stage_order = ("teacher", student)
  c.stages = ml_collections.ConfigDict()
  c.stages.teacher = config_base.folder_config("diffusion", a.name, a.data_dir)
  c.stages[student] = config_base.folder_config(a.mode, a.name, a.data_dir, a.steps,
                                                teacher="stage:teacher")
  for stage, steps in ((c.stages.teacher, a.teacher_steps), (c.stages[student], a.student_steps)):
    stage.batch_size = a.batch
    stage.num_train_steps = steps
    stage.checkpoint_every_steps = max(1, min(1000, steps))
  c.stages[student].loss.anneal_steps = max(1, a.student_steps // 2)
  return c
