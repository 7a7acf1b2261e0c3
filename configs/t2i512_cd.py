"""512x512 text-to-image Multistep Consistency Distillation (docs/maths.md §7, Table 6), from a
diffusion teacher with classifier-free guidance.

    python -m multistep_cm.main \
        --config=configs/t2i512_cd.py:steps=8,teacher=gs://BUCKET/mcm/t2i512_diffusion,guidance=0.5 \
        --config.data.dataset=tfds:text_images/NAME --config.data.data_dir=gs://BUCKET/tfds \
        --workdir=gs://BUCKET/mcm/t2i512_cd8

Variants: steps=4|8|16, teacher=PATH (the diffusion run the student starts from and
distils), guidance=W (the CD teacher's guidance; Table 6 distils g = 0.5 and g = 3).
Paper settings (§7.1, App. A.1): CD only, batch 2048, 30k steps, teacher steps fixed at
256, eta 0.75 on the conditional output, pseudo-Huber epsilon 1, 256 v5e chips (0.71
steps/s, §7.3). The dataset is one the user prepares (docs/data.md, text-image data).
As our reading of the paper's network stands, the step does not fit a v5e chip at 8 images
per chip (docs/performance.md, the 512-px student on v5e-256, which says what we tried).
Expected FID30k (Table 6, private data): 8.7 / 8.1 / 7.9 at 4 / 8 / 16 steps with the
g = 0.5 teacher (teacher 7.9 at 256 steps); 12.4 / 13.9 / 14.4 with g = 3.
"""
from multistep_cm.config import base as config_base


def get_config(arg=None):
  a = config_base.parse_arg(arg, steps=8, teacher="", guidance=0.5)
  return config_base.t2i_config("cd", a.steps, a.teacher, a.guidance)
