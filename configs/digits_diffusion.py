"""Embedded 8x8 digits: the diffusion teacher (no download needed).

    python -m multistep_cm.main --config=configs/digits_diffusion.py \
        --workdir=/tmp/mcm_digits/teacher

Variants: size=8|16.
Expected: see docs/results.md's digits table (evaluate with python -m multistep_cm.evaluate).
"""
from multistep_cm.config import base as config_base


def get_config(arg=None):
  a = config_base.parse_arg(arg, size=8, steps=4, teacher="")
  return config_base.digits_config("diffusion", a.steps, a.size, a.teacher)
