"""The SD VAE (models/vae.py) against diffusers' `AutoencoderKL`, through the converter.

Small AutoencoderKLs (two levels of 16-32 with GroupNorm 8, and sd-vae-ft-ema's four levels
narrowed to 8-8-16-16 with GroupNorm 4; two ResNet blocks each, mid-block attention, 4 latent
channels) with random weights are saved, converted by `python -m multistep_cm.convert
--from=sd-vae`, and their encoder mean and decoder are compared on fixed inputs (float32, <= 1e-4
relative). The legacy attention names convert to the same variables; a wrong mapping fails the
comparison; bad sources are one error line.
"""
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from diffusers import AutoencoderKL
from safetensors import torch as safetensors_torch

from multistep_cm import convert
from multistep_cm.models import vae
from multistep_cm.teachers import weights as teacher_weights

TOL = 1e-4
SMALL = dict(block_out_channels=(16, 32), layers_per_block=2, norm_num_groups=8,
             latent_channels=4)


def _diffusers_vae(seed=0, **config):
  torch.manual_seed(seed)
  config = {**SMALL, **config}
  levels = len(config["block_out_channels"])
  model = AutoencoderKL(in_channels=3, out_channels=3, sample_size=16,
                        down_block_types=("DownEncoderBlock2D",) * levels,
                        up_block_types=("UpDecoderBlock2D",) * levels, **config).eval()
  with torch.no_grad():
    for name, p in model.named_parameters():  # norms off their initial values too
      if "norm" in name:
        p.add_(0.2 * torch.randn_like(p))
  return model


def _convert(tmp_path, state_dict, suffix=".safetensors", extra=("--norm_num_groups=8",)):
  src, out = str(tmp_path / f"vae{suffix}"), str(tmp_path / "vae.npz")
  if suffix == ".safetensors":
    safetensors_torch.save_file({k: v.contiguous() for k, v in state_dict.items()}, src)
  else:
    torch.save(state_dict, src)
  convert.main(["--from=sd-vae", f"--src={src}", f"--out={out}", *extra])
  with open(convert.settings_path(out)) as f:
    record = json.load(f)
  return ({"params": teacher_weights.read(out)}, vae.from_settings(convert.settings_path(out)),
          record)


def _images(n=2, size=16, seed=0):
  return np.random.default_rng(seed).uniform(-1, 1, (n, 3, size, size)).astype(np.float32)


def _relative(got, want):
  return float(np.abs(got - want).max() / np.abs(want).max())


def _nhwc(x):
  return jnp.asarray(x.transpose(0, 2, 3, 1))


def _nchw(x):
  return np.asarray(x).transpose(0, 3, 1, 2)


# sd-vae-ft-ema's four levels (three downsamplings), narrower: 8-8-16-16, GroupNorm 4.
FOUR_LEVELS = dict(block_out_channels=(8, 8, 16, 16), norm_num_groups=4)


@pytest.mark.parametrize("suffix,config", [(".safetensors", {}), (".bin", {}),
                                           (".safetensors", FOUR_LEVELS)])
def test_encoder_mean_and_decoder_match_diffusers_through_the_converter(tmp_path, suffix,
                                                                         config):
  model = _diffusers_vae(**config)
  groups = config.get("norm_num_groups", 8)
  variables, module, record = _convert(tmp_path, model.state_dict(), suffix,
                                       [f"--norm_num_groups={groups}"])
  widths = list(config.get("block_out_channels", (16, 32)))
  assert record["settings"]["block_out_channels"] == widths
  assert record["settings"]["scaling_factor"] == 0.18215
  side = 8  # the latents' side; the images are 2^(levels - 1) times larger
  size = side * 2 ** (len(widths) - 1)
  images = _images(size=size)
  with torch.no_grad():
    posterior = model.encode(torch.from_numpy(images)).latent_dist
    want_mean = posterior.mean.numpy()
    latents = np.random.default_rng(1).normal(size=want_mean.shape).astype(np.float32)
    want_image = model.decode(torch.from_numpy(latents)).sample.numpy()
  got_mean = _nchw(module.apply(variables, _nhwc(images), method=module.encode))
  assert got_mean.shape == want_mean.shape == (2, 4, side, side)
  assert _relative(got_mean, want_mean) <= TOL, _relative(got_mean, want_mean)
  got_image = _nchw(module.apply(variables, _nhwc(latents), method=module.decode))
  assert got_image.shape == want_image.shape == (2, 3, size, size)
  assert _relative(got_image, want_image) <= TOL, _relative(got_image, want_image)
  # The sampled latent: mean + exp(logvar / 2) * noise, with diffusers' std.
  sample = module.apply(variables, _nhwc(images), jax.random.PRNGKey(0),
                        method=module.encode_sample)
  noise = jax.random.normal(jax.random.PRNGKey(0), sample.shape)
  got_std = (np.asarray(sample) - np.asarray(_nhwc(got_mean))) / np.asarray(noise)
  assert _relative(_nchw(got_std), posterior.std.numpy()) <= 1e-3


def test_the_model_scale_is_the_scaling_factor(tmp_path):
  variables, module, _ = _convert(tmp_path, _diffusers_vae().state_dict())
  images = _nhwc(_images())
  mean = module.apply(variables, images, method=module.encode)
  np.testing.assert_allclose(module.apply(variables, images, method=module.to_model),
                             0.18215 * mean, rtol=1e-6)
  np.testing.assert_allclose(module.apply(variables, 0.18215 * mean, method=module.from_model),
                             module.apply(variables, mean, method=module.decode), rtol=1e-5,
                             atol=1e-5)


def _legacy_names(state_dict):
  """diffusers' current attention names as the published sd-vae-ft-* files have them."""
  out = {}
  for name, value in state_dict.items():
    for new, old in (("to_q.", "query."), ("to_k.", "key."), ("to_v.", "value."),
                     ("to_out.0.", "proj_attn.")):
      if ".attentions." in name:
        name = name.replace(new, old)
    out[name] = value
  return out


def test_legacy_attention_names_convert_to_the_same_variables():
  sd = {k: v.numpy() for k, v in _diffusers_vae().state_dict().items()}
  legacy = _legacy_names(sd)
  assert set(legacy) != set(sd)
  _, want = convert.convert_vae(sd, norm_num_groups=8)
  _, got = convert.convert_vae(legacy, norm_num_groups=8)
  assert want.keys() == got.keys()
  for key in want:
    np.testing.assert_array_equal(got[key], want[key], err_msg=key)


def test_a_wrong_mapping_fails_the_comparison(tmp_path, monkeypatch):
  """The conv kernel's spatial axes flipped ([kh, kw] read as [kw, kh]): the encoder differs."""
  real = convert.to_flax_layout
  monkeypatch.setattr(convert, "to_flax_layout", lambda path, value: (
      value.transpose(3, 2, 1, 0) if value.ndim == 4 else real(path, value)))
  model = _diffusers_vae()
  variables, module, _ = _convert(tmp_path, model.state_dict())
  images = _images()
  with torch.no_grad():
    want = model.encode(torch.from_numpy(images)).latent_dist.mean.numpy()
  got = _nchw(module.apply(variables, _nhwc(images), method=module.encode))
  assert _relative(got, want) > 1e-2


def test_sd_vae_defaults_have_diffusers_parameter_count():
  """`AutoencoderKL()` is sd-vae-ft-ema's architecture: diffusers' model of that config has
  the same number of parameters (83.65M)."""
  with torch.device("meta"):
    model = AutoencoderKL(block_out_channels=(128, 256, 512, 512), layers_per_block=2,
                          down_block_types=("DownEncoderBlock2D",) * 4,
                          up_block_types=("UpDecoderBlock2D",) * 4, latent_channels=4,
                          norm_num_groups=32, sample_size=256)
  want = sum(p.numel() for p in model.parameters())
  module = vae.AutoencoderKL()
  shapes = jax.eval_shape(module.init, jax.random.PRNGKey(0), jnp.zeros((1, 64, 64, 3)))
  assert sum(int(np.prod(x.shape)) for x in jax.tree.leaves(shapes)) == want


def _refused(tmp_path, capsys, state_dict, *fragments, extra=("--norm_num_groups=8",)):
  src = str(tmp_path / "bad.safetensors")
  safetensors_torch.save_file({k: v.contiguous() for k, v in state_dict.items()}, src)
  with pytest.raises(SystemExit) as info:
    convert.main(["--from=sd-vae", f"--src={src}", f"--out={tmp_path / 'o.npz'}", *extra])
  assert info.value.code == 2
  err = capsys.readouterr().err
  assert err.count("\n") == 1 and err.startswith("convert: error: "), err
  for fragment in fragments:
    assert fragment in err, (fragment, err)
  assert not (tmp_path / "o.npz").exists()


def test_bad_sources_are_refused_in_one_line(tmp_path, capsys):
  sd = _diffusers_vae().state_dict()
  _refused(tmp_path, capsys, {**sd, "encoder.mid_block.extra.weight": torch.zeros(1)},
           "unknown key encoder.mid_block.extra.weight")
  _refused(tmp_path, capsys, {k: v for k, v in sd.items() if k != "quant_conv.bias"},
           "missing quant_conv.bias")
  _refused(tmp_path, capsys, {**sd, "decoder.conv_out.bias": torch.zeros(5)},
           "decoder.conv_out.bias: shape (5,)")
  _refused(tmp_path, capsys, sd, "--norm_num_groups=32 does not divide the widths [16, 32]",
           extra=())
