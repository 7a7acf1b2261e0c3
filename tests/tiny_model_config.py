"""A minimal experiment config for the model summary test: digits16 in bfloat16.

    python -m multistep_cm.models.summary --config=tests/tiny_model_config.py
"""
import ml_collections


def get_config(arg=None):
  del arg  # no variants
  config = ml_collections.ConfigDict()
  config.model = ml_collections.ConfigDict(dict(preset="digits16", dtype="bfloat16"))
  config.data = ml_collections.ConfigDict(dict(image_size=16, num_channels=1, num_classes=10))
  return config
