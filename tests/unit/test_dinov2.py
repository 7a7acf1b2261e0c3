"""DINOv2 against the real implementations: transformers' `Dinov2Model` (random weights, CPU
torch) through the converter, PyTorch's own resampling for the position embeddings and EDM2's
image preprocessing, the presets against the published configs' parameter counts, and the
converter's refusals."""
import numpy as np
import pytest
import torch
import torch.nn.functional as F
import transformers
from safetensors import torch as safetensors_torch

from multistep_cm.evaluation import convert_dinov2
from multistep_cm.evaluation import dinov2
from multistep_cm.evaluation import tree_io


def _hf_model(swiglu=False, seed=0):
  """A 2-block, 64-wide Dinov2Model for 56 px (a 4x4 position grid), with LayerScale and
  norms moved off their initial values so a mix-up of them shows."""
  torch.manual_seed(seed)
  config = transformers.Dinov2Config(hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                                     image_size=56, patch_size=14, use_swiglu_ffn=swiglu)
  model = transformers.Dinov2Model(config).eval()
  with torch.no_grad():
    for name, p in model.named_parameters():
      if "lambda1" in name or "norm" in name:
        p.add_(0.3 * torch.randn_like(p))
  return model


def _state_dict(model):
  return {k: v.detach().numpy().copy() for k, v in model.state_dict().items()}


def _convert(tmp_path, model, suffix=".safetensors", extra=()):
  src, out = str(tmp_path / f"model{suffix}"), str(tmp_path / "model.npz")
  if suffix == ".safetensors":
    safetensors_torch.save_file(model.state_dict(), src)
  else:
    torch.save(model.state_dict(), src)
  convert_dinov2.main([f"--src={src}", f"--out={out}", "--heads=4", *extra])
  return out


@pytest.mark.parametrize("swiglu,suffix", [(False, ".safetensors"), (True, ".bin")])
def test_cls_features_match_transformers_through_the_converter(tmp_path, swiglu, suffix):
  model = _hf_model(swiglu)
  # HuggingFace resizes position embeddings to the grid's size: offset 0.
  config, variables = dinov2.load_dinov2(
      _convert(tmp_path, model, suffix, ["--interpolate_offset=0"]))
  assert config.swiglu == swiglu and config.pos_grid == 4 and config.heads == 4
  rng = np.random.default_rng(0)
  for size in (56, 70):  # the trained 4x4 grid, and 5x5 (position embeddings interpolated)
    x = rng.normal(size=(3, size, size, 3)).astype(np.float32)
    with torch.no_grad():
      want = model(pixel_values=torch.from_numpy(x.transpose(0, 3, 1, 2))).pooler_output.numpy()
    got = np.asarray(dinov2.DinoV2(config).apply(variables, x))
    assert np.abs(got - want).max() <= 1e-4 * np.abs(want).max(), size


def _published_hf_names(state_dict):
  """transformers 5's names -> those of the checkpoints published on HuggingFace (the
  legacy names transformers' own conversion mapping renames on load)."""
  out = {}
  for name, value in state_dict.items():
    for new, old in (("attention.q_proj", "attention.attention.query"),
                     ("attention.k_proj", "attention.attention.key"),
                     ("attention.v_proj", "attention.attention.value"),
                     ("attention.o_proj", "attention.output.dense"),
                     ("mlp.down_proj", "mlp.weights_out")):
      name = name.replace(new, old)
    if "mlp.up_proj" in name:
      continue
    if "mlp.gate_proj" in name:
      name, up = name.replace("gate_proj", "weights_in"), name.replace("gate_proj", "up_proj")
      value = np.concatenate([value, state_dict[up]])
    out[name] = value
  return out


def _hub_names(state_dict, layers):
  """transformers 5's names -> the torch hub's (`vision_transformer.py`), q|k|v fused."""
  sd = state_dict
  out = {"cls_token": sd["embeddings.cls_token"], "pos_embed": sd["embeddings.position_embeddings"],
         "mask_token": sd["embeddings.mask_token"],
         "patch_embed.proj.weight": sd["embeddings.patch_embeddings.projection.weight"],
         "patch_embed.proj.bias": sd["embeddings.patch_embeddings.projection.bias"],
         "norm.weight": sd["layernorm.weight"], "norm.bias": sd["layernorm.bias"]}
  for i in range(layers):
    hf, hub = f"encoder.layer.{i}.", f"blocks.{i}."
    for leaf in ("weight", "bias"):
      out[hub + f"attn.qkv.{leaf}"] = np.concatenate(
          [sd[hf + f"attention.{p}_proj.{leaf}"] for p in "qkv"])
      out[hub + f"attn.proj.{leaf}"] = sd[hf + f"attention.o_proj.{leaf}"]
      for norm in ("norm1", "norm2"):
        out[hub + f"{norm}.{leaf}"] = sd[hf + f"{norm}.{leaf}"]
      if hf + "mlp.fc1.weight" in sd:
        out[hub + f"mlp.fc1.{leaf}"] = sd[hf + f"mlp.fc1.{leaf}"]
        out[hub + f"mlp.fc2.{leaf}"] = sd[hf + f"mlp.fc2.{leaf}"]
      else:
        out[hub + f"mlp.w12.{leaf}"] = np.concatenate(
            [sd[hf + f"mlp.gate_proj.{leaf}"], sd[hf + f"mlp.up_proj.{leaf}"]])
        out[hub + f"mlp.w3.{leaf}"] = sd[hf + f"mlp.down_proj.{leaf}"]
    out[hub + "ls1.gamma"] = sd[hf + "layer_scale1.lambda1"]
    out[hub + "ls2.gamma"] = sd[hf + "layer_scale2.lambda1"]
  return out


@pytest.mark.parametrize("swiglu", [False, True])
def test_every_naming_converts_to_the_same_variables(swiglu):
  sd = _state_dict(_hf_model(swiglu))
  _, want = convert_dinov2.convert_state_dict(sd, heads=4)
  for renamed in (_published_hf_names(sd), _hub_names(sd, 2)):
    assert set(renamed) != set(sd)
    _, got = convert_dinov2.convert_state_dict(renamed, heads=4)
    flat_got, flat_want = tree_io.flatten(got), tree_io.flatten(want)
    assert flat_got.keys() == flat_want.keys()
    for key, value in flat_want.items():
      np.testing.assert_array_equal(flat_got[key], value, err_msg=key)


# The published configs: facebook/dinov2-{small,base,large,giant}'s config.json (image 518,
# patch 14, mlp_ratio 4) and the hub's vit_small/base/large/giant2.
PUBLISHED = {"S/14": (384, 12, 6, False), "B/14": (768, 12, 12, False),
             "L/14": (1024, 24, 16, False), "g/14": (1536, 40, 24, True)}


@pytest.mark.parametrize("size", sorted(PUBLISHED))
def test_presets_are_the_published_networks(size):
  hidden, layers, heads, swiglu = PUBLISHED[size]
  preset = dinov2.PRESETS[size]
  assert (preset.hidden, preset.layers, preset.heads, preset.swiglu) == PUBLISHED[size]
  assert (preset.patch, preset.pos_grid) == (14, 518 // 14)
  config = transformers.Dinov2Config(hidden_size=hidden, num_hidden_layers=layers,
                                     num_attention_heads=heads, image_size=518, patch_size=14,
                                     use_swiglu_ffn=swiglu)
  with torch.device("meta"):  # shapes only, no memory
    reference = transformers.Dinov2Model(config)
  shapes = {k: tuple(v.shape) for k, v in reference.state_dict().items()}
  want = sum(int(np.prod(s)) for k, s in shapes.items() if k != "embeddings.mask_token")
  got = sum(int(np.prod(s)) for s in dinov2.variable_shapes(preset).values())
  assert got == want
  width = "gate_proj" if swiglu else "fc1"
  assert shapes[f"encoder.layer.0.mlp.{width}.weight"][0] == preset.mlp_hidden


@pytest.mark.parametrize("size_in,size_out", [(37, 16), (4, 5), (37, 37), (16, 37)])
def test_position_embeddings_resize_as_the_hub_does(size_in, size_out):
  """The hub: interpolate(scale_factor=(out + 0.1) / in, mode="bicubic"), unless the grid
  already fits."""
  config = dinov2.Dinov2Config(64, 1, 4, 128, pos_grid=size_in)
  variables = dinov2.random_variables(config)
  pos = variables["params"]["pos_embed"]
  got = np.asarray(dinov2.DinoV2(config).apply(
      variables, pos, size_out, size_out, method=dinov2.DinoV2.position_embeddings))
  if size_in == size_out:
    np.testing.assert_array_equal(got, pos)
    return
  grid = torch.from_numpy(pos[:, 1:].reshape(1, size_in, size_in, -1)).permute(0, 3, 1, 2)
  scale = (size_out + 0.1) / size_in
  want = F.interpolate(grid, scale_factor=(scale, scale), mode="bicubic", antialias=False)
  want = want.permute(0, 2, 3, 1).reshape(1, -1, pos.shape[-1]).numpy()
  np.testing.assert_array_equal(got[:, :1], pos[:, :1])
  np.testing.assert_allclose(got[:, 1:], want, atol=1e-5 * np.abs(want).max())


@pytest.mark.parametrize("size", [28, 64, 224, 256])
def test_preprocessing_is_edm2s(size):
  """EDM2's DINOv2Detector: interpolate(uint8 as float, 224, bicubic, antialias) / 255, then
  ImageNet mean and std; grey repeated to RGB."""
  channels = 1 if size == 28 else 3
  images = np.random.default_rng(size).integers(0, 256, (2, size, size, channels), np.uint8)
  x = torch.from_numpy(images).permute(0, 3, 1, 2).to(torch.float64).expand(-1, 3, -1, -1)
  x = F.interpolate(x, size=(224, 224), mode="bicubic", antialias=True) / 255
  mean = torch.tensor([0.485, 0.456, 0.406], dtype=torch.float64).reshape(1, -1, 1, 1)
  std = torch.tensor([0.229, 0.224, 0.225], dtype=torch.float64).reshape(1, -1, 1, 1)
  want = ((x - mean) / std).permute(0, 2, 3, 1).numpy()
  got = np.asarray(dinov2.preprocess(images))
  assert got.shape == (2, 224, 224, 3)
  np.testing.assert_allclose(got, want, atol=1e-5)
  # The weights themselves against PyTorch's, in float64: resizing the identity's rows.
  eye = torch.from_numpy(np.eye(size)[None, None])
  want_rows = F.interpolate(eye, size=(224, size), mode="bicubic", antialias=True)[0, 0]
  np.testing.assert_allclose(dinov2.antialiased_bicubic_matrix(size, 224), want_rows.numpy(),
                             atol=1e-12)


def _one_error_line(capsys, argv, code, *fragments):
  with pytest.raises(SystemExit) as info:
    convert_dinov2.main(argv)
  assert info.value.code == code
  lines = capsys.readouterr().err.strip().splitlines()
  assert len(lines) == 1 and lines[0].startswith("convert_dinov2: error: "), lines
  for fragment in fragments:
    assert fragment in lines[0], (fragment, lines[0])


def test_converter_refuses_bad_input_in_one_line(tmp_path, capsys):
  out = f"--out={tmp_path / 'out.npz'}"
  _one_error_line(capsys, [f"--src={tmp_path / 'absent.pth'}", out], 2, "no such file")
  _one_error_line(capsys, [out], 2, "--src")
  sd = {k: torch.from_numpy(v) for k, v in _state_dict(_hf_model()).items()}
  registers = dict(sd, **{"embeddings.register_tokens": torch.zeros(1, 4, 64)})
  wrong = {"Conv2d_1a_3x3.conv.weight": torch.zeros(32, 3, 3, 3)}
  short = {k: v for k, v in sd.items() if not k.startswith("encoder.layer.1.norm2")}
  half = {k: v for k, v in sd.items() if "k_proj" not in k}
  for name, state_dict, fragment in (("registers", registers, "register_tokens"),
                                     ("inception", wrong, "Conv2d_1a_3x3"),
                                     ("short", short, "blocks.1.norm2"),
                                     ("half", half, "parts of attn.qkv")):
    src = str(tmp_path / f"{name}.safetensors")
    safetensors_torch.save_file(state_dict, src)
    _one_error_line(capsys, [f"--src={src}", out, "--heads=4"], 2, fragment)
  (tmp_path / "junk.pth").write_bytes(b"not a checkpoint")
  _one_error_line(capsys, [f"--src={tmp_path / 'junk.pth'}", out], 2, "not a torch state dict")
  safetensors_torch.save_file(sd, str(tmp_path / "good.safetensors"))
  _one_error_line(capsys, [f"--src={tmp_path / 'good.safetensors'}", out, "--heads=5"], 2,
                  "--heads=5")
  assert not (tmp_path / "out.npz").exists()


def test_loading_names_the_conversion_and_refuses_other_networks(tmp_path):
  with pytest.raises(FileNotFoundError, match="convert_dinov2"):
    dinov2.load_dinov2(str(tmp_path / "absent.npz"))
  tree_io.save(str(tmp_path / "other.npz"), {"params": {"w": np.zeros(3)}}, {"network": "x"})
  with pytest.raises(ValueError, match="not a converted DINOv2"):
    dinov2.load_dinov2(str(tmp_path / "other.npz"))


def test_the_file_records_network_and_weights(tmp_path):
  model = _hf_model()
  path = _convert(tmp_path, model)
  config, variables = dinov2.load_dinov2(path)
  _, metadata = tree_io.load(path)
  assert metadata["weights_sha256"] == tree_io.digest(variables)
  assert metadata["dinov2_config"] == config.to_dict()
  assert config.interpolate_offset == dinov2.HUB_INTERPOLATE_OFFSET  # the hub's by default
  assert "offset 0.1" in metadata["network"] and metadata["source"] == "model.safetensors"
