"""A latent dataset end to end on the command line: `prepare --latents` encodes a prepared image
folder with a (tiny, random) converted VAE, the main job refuses a config that does not fit it
and trains a tiny teacher on the latents, scoring its decoded samples with the folder's metric
during training, and `sample` writes decoded pictures."""
import os

import numpy as np

from multistep_cm.data import image_folder
from multistep_cm.data import latents

from helpers import assert_one_line_error
from helpers import read_scalars
from helpers import run_main
from helpers import make_folder
from helpers import run_module
from helpers import write_tiny_vae

TINY_IMAGE = "tests/tiny_image_config.py"  # a one-level UViT


def test_prepare_latents_train_score_and_sample(tmp_path):
  make_folder(str(tmp_path / "images"))
  data_dir = str(tmp_path / "tfds")
  image_folder.build(str(tmp_path / "images"), "shapes", data_dir, holdout=0.25, progress=False)
  vae = str(tmp_path / "vae.safetensors")
  write_tiny_vae(vae)
  proc = run_module("multistep_cm.data.prepare", "--latents=folder:shapes", f"--vae={vae}",
                    "--name=shapes_sd", f"--data_dir={data_dir}", "--batch_size=7")
  assert proc.stdout.strip().splitlines()[-1] == latents.dataset_path("shapes_sd", data_dir)
  assert ("--config.data.dataset=latent:shapes_sd --config.data.image_size=8 "
          "--config.data.num_channels=4 --config.data.num_classes=2") in proc.stderr

  # A --data_dir that cannot be written: one line, exit 6 (docs/operations.md), nothing made.
  proc = run_module("multistep_cm.data.prepare", "--latents=folder:shapes", f"--vae={vae}",
                    "--name=other", f"--data_dir={vae}", check=False)
  assert_one_line_error(proc, 6, "--data_dir: cannot write to", "not a directory")

  data = {"data.dataset": "latent:shapes_sd", "data.data_dir": data_dir,
          "data.image_size": 8, "data.num_channels": 4, "data.num_classes": 2,
          "num_train_steps": 4, "checkpoint_every_steps": 4, "evals.every_steps": 4,
          "evals.num_samples": 16, "evals.sample_steps": 2, "sample_every_steps": 4,
          "sample_num": 4}
  proc = run_main(TINY_IMAGE, tmp_path / "refused", {**data, "data.random_flip": True},
                  check=False)
  assert_one_line_error(proc, 2, "random_flip=True with data.dataset='latent:shapes_sd'")
  assert not os.path.exists(tmp_path / "refused" / "config.json")

  workdir = tmp_path / "teacher"
  run_main(TINY_IMAGE, workdir, data)
  scalars, _ = read_scalars(str(workdir))
  # The folder metric of the source images (16x16 RGB): only decoded samples fit it.
  assert [s for s, _ in scalars["eval/fd"]] == [4] and np.isfinite(scalars["eval/fd"][0][1])

  out = str(tmp_path / "samples.npz")
  run_module("multistep_cm.sample", f"--workdir={workdir}", "--num_samples=3", "--steps=2",
             f"--output={out}", "--progress=false")
  with np.load(out) as f:
    assert f["images"].shape == (3, 16, 16, 3) and f["images"].dtype == np.uint8
