"""ImageNet128 diffusion teacher (the UViT of simple diffusion, docs/maths.md §7.2).

    python -m multistep_cm.main --config=configs/imagenet128_diffusion.py:size=small \
        --workdir=gs://BUCKET/mcm/in128_small_diffusion

Variants: size=small|large. Expected: the paper's teachers reach FID 2.2 (small and large) with
512-step aDDIM (Table 1); their training hyperparameters are not in the paper (our choices in
multistep_cm/config/base.py).
"""
from multistep_cm.config import base as config_base


def get_config(arg=None):
  a = config_base.parse_arg(arg, size="small")
  return config_base.imagenet_config(128, "diffusion", a.size)
