"""ImageNet-256 Multistep CD from the converted DiT-XL/2 teacher, in the SD VAE's latent space.

    python -m multistep_cm.data.prepare --latents=imagenet2012 --image_size=256 \
        --vae=sd_vae.safetensors --name=imagenet256_sd --data_dir=gs://BUCKET/tfds
    python -m multistep_cm.main \
        --config=configs/imagenet256_dit_cd.py:steps=4,teacher=gs://BUCKET/dit_xl_2.safetensors \
        --config.data.data_dir=gs://BUCKET/tfds --workdir=gs://BUCKET/mcm/in256_dit_cd4

The teacher is DiT-XL/2 (models/dit.py), its published weights converted by
`convert --from=dit` (docs/teachers.md), called in its own frame through the adapter
(ε-prediction on DDPM's linear β, its time the step 0-999). The student is the same network starting from the teacher's weights (§7.1),
on the teacher's schedule. The data are the SD VAE's latents of ImageNet at 256 px
(data/latents.py); the same VAE decodes the samples for grids and FID. Settings:
`imagenet256_latent_cd_config` in multistep_cm/config/base.py (the paper's ImageNet CD
settings where they carry over; our choices are marked there).

Variants: steps=1|2|4|8, teacher=PATH (the converted weights file), guidance=W (0.5: cfg
scale 1.5, the DiT paper's FID setting), data=NAME (the latent dataset).
"""
from multistep_cm.config import base as config_base


def get_config(arg=None):
  a = config_base.parse_arg(arg, steps=4, teacher="", guidance=0.5, data="imagenet256_sd")
  return config_base.imagenet256_latent_cd_config("dit", a.steps, a.teacher, a.guidance, a.data)
