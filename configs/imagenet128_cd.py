"""ImageNet128 Multistep Consistency Distillation (§3, Algorithm 1), from a diffusion teacher.

    python -m multistep_cm.main \
        --config=configs/imagenet128_cd.py:size=small,steps=8,teacher=gs://BUCKET/mcm/in128_small_diffusion \
        --workdir=gs://BUCKET/mcm/in128_small_cd8

Variants: size=small|large, steps=1|2|4|8|16, teacher=PATH (the diffusion run the student
starts from and distils), guidance=W (CD teacher guidance).
Paper settings (§7.1): batch 2048, 200k steps, teacher steps 64 -> 1280 over 100k, eta 0.75,
pseudo-Huber epsilon 1e-4, student initialised from the teacher.
Expected FID (Table 1, small / large): 8.5/7.0 (1 step), 3.1/3.1 (2), 2.4/2.3 (4), 2.1/2.1 (8), 2.0/2.0 (16).
"""
from multistep_cm.config import base as config_base


def get_config(arg=None):
  a = config_base.parse_arg(arg, size="small", steps=8, teacher="", guidance=0.0)
  return config_base.imagenet_config(128, "cd", a.size, a.steps, a.teacher, a.guidance)
