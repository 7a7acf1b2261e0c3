"""A VAE trained here (`data.train_vae`) on the embedded digits: it reconstructs held-out digits
far better than their mean image does, its scaling factor gives the encoded training images
unit variance, `prepare --latents=digits` encodes the digits with it, and the main job's
`latents=` variant trains on them, scored as 16x16 digits; bad flags are one line."""
import json
import os

import jax.numpy as jnp
import numpy as np
import pytest

from multistep_cm.data import digits
from multistep_cm.data import latents

from helpers import assert_one_line_error
from helpers import file_config
from helpers import run_module

TRAIN_VAE = "multistep_cm.data.train_vae"
TINY = ("--dataset=digits", "--image_size=16", "--channels=8,16", "--groups=4",
        "--batch_size=32")


def test_train_a_vae_on_the_digits_and_encode_them(tmp_path):
  out = str(tmp_path / "vae.safetensors")
  proc = run_module(TRAIN_VAE, *TINY, "--steps=150", f"--out={out}")
  trained = json.loads(proc.stdout.strip().splitlines()[-1])
  # The mean image is what a VAE that learnt nothing reconstructs at best.
  assert trained["heldout_rmse"] < 0.5 * trained["mean_image_rmse"], trained
  with open(os.path.splitext(out)[0] + ".json") as f:
    assert json.load(f)["trained"] == trained

  vae = latents.load_vae(out)
  images, _ = digits.load_digits("train", 16)
  means = np.concatenate([np.asarray(vae.moments(jnp.asarray(images[i:i + 256]))[0])
                          for i in range(0, len(images), 256)])
  assert means.shape == (len(images), 8, 8, 4)
  np.testing.assert_allclose(means.std(), 1.0, rtol=1e-3)  # moments are in the model's space

  data_dir = str(tmp_path / "tfds")
  proc = run_module("multistep_cm.data.prepare", "--latents=digits", f"--vae={out}",
                    "--name=digits_vae", "--image_size=16", f"--data_dir={data_dir}")
  record = latents.read_record("digits_vae", data_dir)
  assert (record["source"], record["image_size"], record["channels"]) == ("digits", 16, 1)
  assert (record["latent_size"], record["latent_channels"], record["num_classes"]) == (8, 4, 10)
  assert record["splits"] == {"train": len(images)}

  config = file_config(f"configs/digits_pipeline.py:latents=digits_vae,data_dir={data_dir}")
  for stage in config.stage_order:
    data = config.stages[stage].data
    assert (data.dataset, data.image_size, data.num_channels) == ("latent:digits_vae", 8, 4)
    assert not data.random_flip
    pixels = latents.pixel_config(config.stages[stage]).data
    assert (pixels.dataset, pixels.image_size, pixels.num_channels) == ("digits", 16, 1)
  with pytest.raises(ValueError, match="latent dataset 'nope' is not prepared"):
    file_config(f"configs/digits_pipeline.py:latents=nope,data_dir={data_dir}")
  with pytest.raises(ValueError, match="latents= is made for size=8, frame=vp, arch=uvit"):
    file_config(f"configs/digits_pipeline.py:latents=digits_vae,arch=adm,data_dir={data_dir}")


def test_refusals_are_one_line(tmp_path):
  out = str(tmp_path / "vae.safetensors")
  for flags, code, fragment in (
      (("--dataset=nope",), 2, "--dataset=nope: give a prepared image dataset"),
      (("--channels=8,10",), 2, "every width must be a positive multiple of --groups=4"),
      (("--channels=8,16,32,64,128,256",), 2, "the size must be a multiple of 32"),
      (("--image_size=12",), 2, "--dataset=digits: digits image_size must be one of"),
      (("--batch_size=5000",), 2, "is more than the 1438 training images")):
    proc = run_module(TRAIN_VAE, *TINY, *flags, "--steps=1", f"--out={out}", check=False)
    assert_one_line_error(proc, code, fragment)
  blocker = tmp_path / "file"
  blocker.write_text("")
  proc = run_module(TRAIN_VAE, *TINY, "--steps=1", f"--out={blocker}/vae.safetensors",
                    check=False)
  assert_one_line_error(proc, 6, "--out: cannot write to")
  assert not os.path.exists(out)
