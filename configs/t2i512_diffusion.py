"""512x512 text-to-image diffusion teacher (the UViT of docs/maths.md §7.2, text-conditioned).

    python -m multistep_cm.main --config=configs/t2i512_diffusion.py \
        --config.data.dataset=tfds:text_images/NAME --config.data.data_dir=gs://BUCKET/tfds \
        --workdir=gs://BUCKET/mcm/t2i512_diffusion

The paper's teacher reaches FID30k 7.9 (g = 0.5) and 12.7 (g = 3) at 256 steps on private
data (Table 6); its training hyperparameters are not in the paper (our choices in
multistep_cm/config/base.py), nor is its text encoder (T5-XXL widths, our choice).
"""
from multistep_cm.config import base as config_base


def get_config(arg=None):
  config_base.parse_arg(arg)  # no variants: any is refused
  return config_base.t2i_config("diffusion")
