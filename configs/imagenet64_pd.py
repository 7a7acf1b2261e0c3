"""ImageNet64 Progressive Distillation (Salimans & Ho 2022), the paper's baseline, as stages.

    python -m multistep_cm.main \
        --config=configs/imagenet64_pd.py:size=small,teacher=gs://BUCKET/mcm/in64_small_diffusion \
        --workdir=gs://BUCKET/mcm/in64_small_pd

Stages pd<N> for N = start/2, ..., end (diffusion/losses.py, `pd_loss`): each student
matches two steps of its 2N-step teacher with one, starting from and distilling the
stage before it; the first distils the diffusion run `teacher`. Each samples with DDIM
on its N uniform steps. The official ImageNet64 outer loop (docs/maths.md §14.2): from
1024 teacher steps, 50k steps per halving at batch 2048, Adam at 1e-4 annealed linearly
to 0 in each halving, no EMA (config_base.imagenet_pd_config); the paper's
re-implementation takes the teacher's steps with aDDIM (Tables 3 and 5), everything else
about it is not stated.
Expected FID (small IN64, Table 3 / Table 5, PD re-implemented with aDDIM): 10.7 (1 step), 4.7 (2),
2.4 (4), 1.7-1.8 (8).

Variants: size=small|large, teacher=PATH, start=1024, end=1, halving_steps=50000,
solver=addim|ddim (the teacher's steps), guidance=W (teacher guidance).
"""
from multistep_cm.config import base as config_base


def get_config(arg=None):
  a = config_base.parse_arg(arg, size="small", teacher="", start=1024, end=1,
                            halving_steps=50_000, solver="addim", guidance=0.0)
  return config_base.imagenet_pd_config(64, a.size, a.teacher, a.start, a.end,
                                        a.halving_steps, a.solver, a.guidance)
