"""A tiny staged pipeline for the kill-storm test: a mixture teacher, then a 2-step CD student.

    python -m multistep_cm.main --config=tests/tiny_staged_config.py --workdir=/tmp/storm

The mixture MLP of the tests (width 32, depth 2, batch 64 on a 2x4 mesh), a checkpoint
every step (so kills land inside checkpoint writes) and example ids recorded, so a run
killed and restarted many times can be compared with an uninterrupted one on its
checkpoints and on the data it consumed.
"""
import ml_collections

from multistep_cm.config import base as config_base


def get_config(arg=None):
  del arg  # no variants
  c = ml_collections.ConfigDict()
  c.stage_order = ("teacher", "cd2")
  c.stages = ml_collections.ConfigDict()
  c.stages.teacher = config_base.mixture_config("diffusion")
  c.stages.cd2 = config_base.mixture_config("cd", 2, teacher="stage:teacher")
  for stage, steps in ((c.stages.teacher, 30), (c.stages.cd2, 20)):
    stage.num_train_steps = steps
    stage.batch_size = 64
    stage.model.width, stage.model.depth = 32, 2
    stage.mesh.data, stage.mesh.fsdp = 2, 4
    stage.optimizer.warmup_steps = 5
    stage.log_every_steps = 5
    stage.checkpoint_every_steps = 1
    stage.checkpoint_keep = 2
    stage.record_example_ids = True
  c.stages.cd2.loss.teacher_steps_start, c.stages.cd2.loss.teacher_steps_end = 8, 16
  c.stages.cd2.loss.anneal_steps = 10
  return c
