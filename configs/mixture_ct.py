"""The toy Gaussian mixture (8-d, five modes, exact denoiser) through the main trainer: ct.

    python -m multistep_cm.main --config=configs/mixture_ct.py:steps=8,teacher=/tmp/mcm_mix/teacher \
        --workdir=/tmp/mcm_mix/ct8

The toy experiment with the exact teacher and the energy-distance table is
`python -m multistep_cm.toy`; this config trains the same MLP with the full trainer.
"""
from multistep_cm.config import base as config_base


def get_config(arg=None):
  a = config_base.parse_arg(arg, steps=8, teacher="", dim=8)
  return config_base.mixture_config("ct", a.steps, a.teacher, a.dim)
