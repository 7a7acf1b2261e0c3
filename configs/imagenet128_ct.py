"""ImageNet128 Multistep Consistency Training (§3, Algorithm 1), from a diffusion teacher.

    python -m multistep_cm.main \
        --config=configs/imagenet128_ct.py:size=small,steps=8,teacher=gs://BUCKET/mcm/in128_small_diffusion \
        --workdir=gs://BUCKET/mcm/in128_small_ct8

Variants: size=small|large, steps=1|2|4|8|16, teacher=PATH (the diffusion run the student
starts from), guidance=W (CD teacher guidance).
Paper settings (§7.1): batch 2048, 200k steps, teacher steps 64 -> 1280 over 100k, eta 0.75,
pseudo-Huber epsilon 1e-4, student initialised from the teacher.
Expected FID (Table 1, small / large): 16.0/14.5 (1 step), 6.0/4.2 (2), 4.0/2.7 (4), 3.3/2.2 (8), 3.4/2.3 (16).
"""
from multistep_cm.config import base as config_base


def get_config(arg=None):
  a = config_base.parse_arg(arg, size="small", steps=8, teacher="", guidance=0.0)
  return config_base.imagenet_config(128, "ct", a.size, a.steps, a.teacher, a.guidance)
