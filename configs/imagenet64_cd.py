"""ImageNet64 Multistep Consistency Distillation (§3, Algorithm 1), from a diffusion teacher.

    python -m multistep_cm.main \
        --config=configs/imagenet64_cd.py:size=small,steps=8,teacher=gs://BUCKET/mcm/in64_small_diffusion \
        --workdir=gs://BUCKET/mcm/in64_small_cd8

Variants: size=small|large, steps=1|2|4|8|16, teacher=PATH (the diffusion run the student
starts from and distils), guidance=W (CD teacher guidance).
Paper settings (§7.1): batch 2048, 200k steps, teacher steps 64 -> 1280 over 100k, eta 0.75,
pseudo-Huber epsilon 1e-4, student initialised from the teacher.
Expected FID (Table 1, small / large): 4.3/3.2 (1 step), 2.0/1.9 (2), 1.7/1.6 (4), 1.6/1.4 (8), 1.5/1.4 (16).
"""
from multistep_cm.config import base as config_base


def get_config(arg=None):
  a = config_base.parse_arg(arg, size="small", steps=8, teacher="", guidance=0.0)
  return config_base.imagenet_config(64, "cd", a.size, a.steps, a.teacher, a.guidance)
