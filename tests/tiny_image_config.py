"""A tiny image run for the reliability tests: a one-level UViT on the synthetic JPEG dataset.

    python -m multistep_cm.main --config=tests/tiny_image_config.py --workdir=/tmp/tiny \
        --config.data.data_dir=DIR  # where multistep_cm.data.synthetic.build wrote it

Small enough to compile in seconds on a CPU; the shapes are what the TFDS path feeds
(8x8 RGB, 10 classes).
"""
from multistep_cm.config import base as config_base
from multistep_cm.data import synthetic


def get_config(arg=None):
  del arg  # no variants
  c = config_base.digits_config("diffusion")
  c.data.dataset = synthetic.NAME
  c.data.image_size, c.data.num_channels, c.data.num_classes = 8, 3, 10
  c.model.update(dict(channels=(8,), num_blocks=(1,), mid_channels=32, mid_blocks=1,
                      dropout=(0.0, 0.0), emb_dim=32, head_dim=16, num_groups=4))
  c.batch_size = 16  # data parallel over 1, 2, 4, 8 or 16 devices
  c.num_train_steps = 20
  c.optimizer.warmup_steps = 2
  c.log_every_steps = c.checkpoint_every_steps = 1
  c.sample_every_steps = 0
  return c
