"""ImageNet128 Progressive Distillation (Salimans & Ho 2022), the paper's baseline, as stages.

    python -m multistep_cm.main \
        --config=configs/imagenet128_pd.py:size=small,teacher=gs://BUCKET/mcm/in128_small_diffusion \
        --workdir=gs://BUCKET/mcm/in128_small_pd

The stages and settings of configs/imagenet64_pd.py (the official ImageNet64 outer loop,
config_base.imagenet_pd_config) on the 128x128 teacher.
Expected FID (small IN128, Table 5, PD re-implemented with aDDIM): 8.0 (2 steps), 3.8 (4), 2.5 (8).

Variants: size=small|large, teacher=PATH, start=1024, end=1, halving_steps=50000,
solver=addim|ddim (the teacher's steps), guidance=W (teacher guidance).
"""
from multistep_cm.config import base as config_base


def get_config(arg=None):
  a = config_base.parse_arg(arg, size="small", teacher="", start=1024, end=1,
                            halving_steps=50_000, solver="addim", guidance=0.0)
  return config_base.imagenet_pd_config(128, a.size, a.teacher, a.start, a.end,
                                        a.halving_steps, a.solver, a.guidance)
