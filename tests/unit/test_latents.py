"""VAE latent datasets (data/latents.py): what is stored is the VAE's posterior of each image in
the model's space, the train step draws from it, samples decode to the source's pictures, and
configs that do not fit are refused in one line."""
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from multistep_cm.config import base as config_base
from multistep_cm.config import build as config_build
from multistep_cm.config import checks as config_checks
from multistep_cm.config import plan as plan_lib
from multistep_cm.data import image_folder
from multistep_cm.data import latents
from multistep_cm.data import tfds_source
from multistep_cm.data.sources import DatasetError
from multistep_cm.diffusion import losses
from multistep_cm.training import step as train_step

from helpers import make_folder
from helpers import write_tiny_vae

@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
  root = tmp_path_factory.mktemp("latents")
  make_folder(str(root / "images"))
  data_dir = str(root / "tfds")
  image_folder.build(str(root / "images"), "shapes", data_dir, holdout=0.25, progress=False)
  vae_path = str(root / "vae.safetensors")
  module = write_tiny_vae(vae_path)
  path, record = latents.build("folder:shapes", vae_path, "shapes_sd", data_dir, batch_size=5,
                               progress=False)
  return {"data_dir": data_dir, "vae": vae_path, "module": module, "path": path,
          "record": record}


def latent_config(data_dir, **data):
  c = config_base.digits_config("diffusion")
  c.data.update({"dataset": "latent:shapes_sd", "data_dir": data_dir, "image_size": 8,
                 "num_channels": 4, "num_classes": 2, **data})
  c.model.update(dict(channels=(8,), num_blocks=(1,), mid_channels=32, mid_blocks=1,
                      dropout=(0.0, 0.0), emb_dim=32, head_dim=16, num_groups=4))
  c.batch_size = 8
  return c


def test_the_record_says_what_was_encoded(prepared):
  record = prepared["record"]
  assert os.path.isdir(prepared["path"]) and record["splits"] == {"train": 18}
  assert (record["source"], record["image_size"], record["channels"]) == ("folder:shapes", 16, 3)
  assert (record["latent_size"], record["latent_channels"]) == (8, 4)
  assert record["vae"] == prepared["vae"] and record["scaling_factor"] == 0.5
  assert record["num_classes"] == 2 and record["class_names"] == ["circles", "squares"]
  assert len(record["vae_sha256"]) == 64


def test_examples_are_the_posterior_of_each_image_times_the_scaling_factor(prepared):
  """The mean and std read back equal the VAE applied here to the folder's own images."""
  images = tfds_source.TfdsSource(f"{image_folder.BUILDER}/shapes", "train",
                                  prepared["data_dir"])
  source = latents.LatentSource("shapes_sd", "train", prepared["data_dir"])
  assert len(source) == len(images) == 18 and source.class_names == ("circles", "squares")
  module = prepared["module"]
  params = {"params": latents.load_vae(prepared["vae"]).params}
  for i in (0, 7, 17):
    mean, logvar = module.apply(params, images[i]["image"][None], method=module.moments)
    got = source[i]
    np.testing.assert_allclose(got["image"], 0.5 * np.asarray(mean[0]), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(got[latents.STD], 0.5 * np.exp(0.5 * np.asarray(logvar[0])),
                               rtol=1e-5, atol=1e-6)
    assert got["label"] == images[i]["label"]
    assert got["image"].dtype == np.float32 and got["image"].shape == (8, 8, 4)


def test_samples_decode_to_the_source_pictures_and_metrics_see_the_source(prepared):
  config = latent_config(prepared["data_dir"])
  plan = plan_lib.RunPlan.from_config(config)
  z = np.random.default_rng(0).normal(size=(3, 8, 8, 4)).astype(np.float32)
  module = prepared["module"]
  want = module.apply({"params": latents.load_vae(prepared["vae"]).params}, z / 0.5,
                      method=module.decode)
  np.testing.assert_allclose(np.asarray(plan.decode(z)), np.asarray(want), rtol=1e-5, atol=1e-5)
  assert plan.decode(z).shape == (3, 16, 16, 3)
  pixels = latents.pixel_config(config)
  assert (pixels.data.dataset, pixels.data.image_size, pixels.data.num_channels) == (
      "folder:shapes", 16, 3)
  assert config.data.dataset == "latent:shapes_sd"  # the run's own config is left as it is
  assert config_base.auto_metric(pixels.data.dataset) == "folder"
  assert plan.class_names == ("circles", "squares")
  assert plan_lib.RunPlan.from_config(config_base.digits_config("diffusion")).decode is None


def test_the_train_step_draws_from_each_posterior(prepared, monkeypatch):
  """The diffusion loss sees mean + std * N(0, 1): a fresh standard normal per element and
  per step, and exactly the mean where the std is 0."""
  plan = plan_lib.RunPlan.from_config(latent_config(prepared["data_dir"]))
  seen = []
  real = losses.diffusion_loss

  def spy(student, x, *args, **kw):
    seen.append(np.asarray(x))
    return real(student, x, *args, **kw)

  monkeypatch.setattr(losses, "diffusion_loss", spy)
  loss_fn = train_step.make_loss_fn(plan, plan.model, plan.schedule)
  params = train_step.init_params(plan.model, jax.random.PRNGKey(0))
  mean = np.full((64, 8, 8, 4), 3.0, np.float32)
  std = np.tile(np.linspace(0.0, 2.0, 64, dtype=np.float32)[:, None, None, None], (1, 8, 8, 4))
  batch = {"image": jnp.asarray(mean), latents.STD: jnp.asarray(std),
           "label": jnp.zeros((64,), jnp.int32)}
  for step in (0, 1):  # eagerly, so the spy sees numbers
    loss_fn(params, None, batch, step, jax.random.PRNGKey(step))
  assert len(seen) == 2
  for x in seen:
    np.testing.assert_array_equal(x[0], mean[0])  # std 0: the mean itself
    eps = (x[1:] - mean[1:]) / std[1:]
    assert abs(eps.mean()) < 0.03 and abs(eps.std() - 1.0) < 0.03
  assert not np.allclose(seen[0][1:], seen[1][1:])  # a new draw at every step
  seen.clear()
  del batch[latents.STD]  # data in pixels (no std): the batch as it is
  loss_fn(params, None, batch, 0, jax.random.PRNGKey(0))
  np.testing.assert_array_equal(seen[0], mean)


def test_configs_that_do_not_fit_are_refused_in_one_line(prepared, tmp_path):
  data_dir = prepared["data_dir"]
  with pytest.raises(config_checks.ConfigError, match="random_flip=True with data.dataset"):
    config_checks.validate(latent_config(data_dir, random_flip=True))
  with pytest.raises(config_checks.ConfigError) as e:
    config_checks.validate(latent_config(data_dir, image_size=16, num_channels=3))
  assert "config.data.image_size=16, but it holds 8x8 images" in str(e.value)
  assert "--config.data.num_channels=4" in str(e.value) and "\n" not in str(e.value)
  config_checks.validate(latent_config(data_dir))  # as prepared: accepted
  with pytest.raises(DatasetError, match="--latents=DATASET --vae=VAE.safetensors --name=nope"):
    config_build.make_source(latent_config(data_dir, dataset="latent:nope"))
  with pytest.raises(latents.InputError, match="already prepared"):
    latents.build("folder:shapes", prepared["vae"], "shapes_sd", data_dir, progress=False)
  with pytest.raises(latents.InputError, match="--vae=.*cannot be loaded"):
    latents.build("folder:shapes", str(tmp_path / "none.safetensors"), "other", data_dir,
                  progress=False)
  with pytest.raises(latents.InputError, match="must be a multiple of 2"):
    latents.build("folder:shapes", prepared["vae"], "odd", data_dir, image_size=15,
                  progress=False)
  assert not os.path.exists(latents.dataset_path("odd", data_dir))
