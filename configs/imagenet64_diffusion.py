"""ImageNet64 diffusion teacher (the UViT of simple diffusion, docs/maths.md §7.2).

    python -m multistep_cm.main --config=configs/imagenet64_diffusion.py:size=small \
        --workdir=gs://BUCKET/mcm/in64_small_diffusion

Variants: size=small|large. Expected: the paper's teachers reach FID 1.5 (small) / 1.4 (large) with
512-step aDDIM (Table 1); their training hyperparameters are not in the paper (our choices in
multistep_cm/config/base.py).
"""
from multistep_cm.config import base as config_base


def get_config(arg=None):
  a = config_base.parse_arg(arg, size="small")
  return config_base.imagenet_config(64, "diffusion", a.size)
