"""Embedded 8x8 digits: Multistep Consistency Training from the teacher's weights (no download needed).

    python -m multistep_cm.main --config=configs/digits_ct.py:steps=4,teacher=/tmp/mcm_digits/teacher \
        --workdir=/tmp/mcm_digits/ct4

Variants: size=8|16, steps=S (student steps), teacher=PATH.
Expected: see docs/results.md's digits table (evaluate with python -m multistep_cm.evaluate).
"""
from multistep_cm.config import base as config_base


def get_config(arg=None):
  a = config_base.parse_arg(arg, size=8, steps=4, teacher="")
  return config_base.digits_config("ct", a.steps, a.size, a.teacher)
