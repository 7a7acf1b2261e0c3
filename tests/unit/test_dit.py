"""DiT and SiT (models/dit.py) against the real implementations, through the converter.

diffusers' `DiTTransformer2DModel`, built from a small config with random weights, is saved,
converted by `python -m multistep_cm.convert --from=dit` and compared on fixed inputs (float32,
<= 1e-4 relative). The authors' naming (DiT's and SiT's `models.py`), which no pip package
provides, is checked against `PaperDiT` below: a PyTorch DiT written here from the paper and
the published modules' structure, itself first checked against diffusers on the same weights.
A deliberately wrong mapping must fail the comparison; bad sources are one error line.
"""
import json
import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from diffusers import DiTTransformer2DModel
from safetensors import torch as safetensors_torch

from multistep_cm import convert
from multistep_cm.evaluation import tree_io
from multistep_cm.models import dit
from multistep_cm.teachers import weights as teacher_weights

HEADS, HEAD_DIM, LAYERS, CLASSES = 2, 16, 2, 10
WIDTH = HEADS * HEAD_DIM
TOL = 1e-4


# --- the authors' DiT, written here ------------------------------------------------------------


class _Block(torch.nn.Module):
  """adaLN-Zero block with the authors' module names (timm's Attention and Mlp inside)."""

  def __init__(self, width, heads, mlp_eps):
    super().__init__()
    self.heads, self.mlp_eps = heads, mlp_eps
    self.attn = torch.nn.Module()
    self.attn.qkv = torch.nn.Linear(width, 3 * width)
    self.attn.proj = torch.nn.Linear(width, width)
    self.mlp = torch.nn.Module()
    self.mlp.fc1 = torch.nn.Linear(width, 4 * width)
    self.mlp.fc2 = torch.nn.Linear(4 * width, width)
    self.adaLN_modulation = torch.nn.Sequential(torch.nn.SiLU(), torch.nn.Linear(width, 6 * width))

  def forward(self, x, c):
    n, tokens, width = x.shape
    shift1, scale1, gate1, shift2, scale2, gate2 = self.adaLN_modulation(c)[:, None].chunk(6, -1)
    h = F.layer_norm(x, (width,), eps=1e-6) * (1 + scale1) + shift1
    q, k, v = self.attn.qkv(h).view(n, tokens, 3, self.heads, -1).permute(2, 0, 3, 1, 4)
    weights = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1]), dim=-1)
    h = self.attn.proj((weights @ v).transpose(1, 2).reshape(n, tokens, width))
    x = x + gate1 * h
    h = F.layer_norm(x, (width,), eps=self.mlp_eps) * (1 + scale2) + shift2
    h = self.mlp.fc2(F.gelu(self.mlp.fc1(h), approximate="tanh"))
    return x + gate2 * h


class PaperDiT(torch.nn.Module):
  """DiT (Peebles & Xie 2023) on NCHW latents with the authors' parameter names. `freq_shift`
  and `mlp_eps` select diffusers' variant of the forward (1 and 1e-5) or the authors' (0, 1e-6).
  SiT is this network; its velocity is the first half of a learned-Σ output."""

  def __init__(self, channels=4, size=8, patch=2, width=WIDTH, depth=LAYERS, heads=HEADS,
               classes=CLASSES, learn_sigma=True, freq_shift=0.0, mlp_eps=1e-6):
    super().__init__()
    self.patch, self.freq_shift = patch, freq_shift
    self.out_channels = 2 * channels if learn_sigma else channels
    self.x_embedder = torch.nn.Module()
    self.x_embedder.proj = torch.nn.Conv2d(channels, width, patch, stride=patch)
    self.t_embedder = torch.nn.Module()
    self.t_embedder.mlp = torch.nn.Sequential(torch.nn.Linear(256, width), torch.nn.SiLU(),
                                              torch.nn.Linear(width, width))
    self.y_embedder = torch.nn.Module()
    self.y_embedder.embedding_table = torch.nn.Embedding(classes + 1, width)
    grid = size // patch
    self.pos_embed = torch.nn.Parameter(self.sincos(grid, width)[None], requires_grad=False)
    self.blocks = torch.nn.ModuleList(_Block(width, heads, mlp_eps) for _ in range(depth))
    self.final_layer = torch.nn.Module()
    self.final_layer.linear = torch.nn.Linear(width, patch * patch * self.out_channels)
    self.final_layer.adaLN_modulation = torch.nn.Sequential(torch.nn.SiLU(),
                                                            torch.nn.Linear(width, 2 * width))

  @staticmethod
  def sincos(grid, width):
    """MAE's 2-D table: channels [0, w/2) encode the column (sin | cos), [w/2, w) the row."""
    k = torch.arange(width // 4, dtype=torch.float64) / (width // 4)
    omega = 10000.0 ** -k
    index = torch.arange(grid * grid)
    parts = []
    for pos in (index % grid, index // grid):
      angle = pos[:, None].double() * omega[None]
      parts += [angle.sin(), angle.cos()]
    return torch.cat(parts, dim=1).float()

  def forward(self, x, t, y):
    n, _, height, _ = x.shape
    x = self.x_embedder.proj(x).flatten(2).transpose(1, 2) + self.pos_embed
    half = 128
    freqs = torch.exp(-math.log(10000.0) * torch.arange(half) / (half - self.freq_shift))
    angle = t[:, None].float() * freqs[None]
    c = self.t_embedder.mlp(torch.cat([angle.cos(), angle.sin()], dim=1))
    c = c + self.y_embedder.embedding_table(y)
    for block in self.blocks:
      x = block(x, c)
    shift, scale = self.final_layer.adaLN_modulation(c)[:, None].chunk(2, -1)
    width = x.shape[-1]
    x = self.final_layer.linear(F.layer_norm(x, (width,), eps=1e-6) * (1 + scale) + shift)
    grid, p, ch = height // self.patch, self.patch, self.out_channels
    x = x.view(n, grid, grid, p, p, ch).permute(0, 5, 1, 3, 2, 4)
    return x.reshape(n, ch, grid * p, grid * p)


# --- helpers -----------------------------------------------------------------------------------


def _diffusers_dit(channels=4, out_channels=8, size=8, seed=0):
  """A 2-block, 32-wide DiTTransformer2DModel with random weights; every block's copy of the
  timestep and class embeddings set to block 0's, as in the published conversion."""
  torch.manual_seed(seed)
  model = DiTTransformer2DModel(num_attention_heads=HEADS, attention_head_dim=HEAD_DIM,
                                in_channels=channels, out_channels=out_channels,
                                num_layers=LAYERS, sample_size=size, patch_size=2,
                                num_embeds_ada_norm=CLASSES).eval()
  with torch.no_grad():
    first = model.transformer_blocks[0].norm1.emb.state_dict()
    for block in model.transformer_blocks[1:]:
      block.norm1.emb.load_state_dict(first)
    for p in model.parameters():  # move every weight off its initial value
      p.add_(0.05 * torch.randn_like(p))
    for block in model.transformer_blocks[1:]:
      block.norm1.emb.load_state_dict(model.transformer_blocks[0].norm1.emb.state_dict())
  return model


def _inputs(channels=4, size=8, n=3, seed=0):
  rng = np.random.default_rng(seed)
  z = rng.normal(size=(n, channels, size, size)).astype(np.float32)
  t = np.asarray([0.0, 17.5, 999.0][:n], np.float32)
  labels = np.asarray([3, CLASSES, 7][:n], np.int64)  # CLASSES: the null class
  return z, t, labels


def _save(tmp_path, state_dict, suffix):
  src = str(tmp_path / f"src{suffix}")
  if suffix == ".safetensors":
    safetensors_torch.save_file({k: v.contiguous() for k, v in state_dict.items()}, src)
  else:
    torch.save(state_dict, src)
  return src


def _convert(tmp_path, state_dict, kind="dit", suffix=".safetensors", out="dit.safetensors",
             extra=()):
  src, out = _save(tmp_path, state_dict, suffix), str(tmp_path / out)
  convert.main([f"--from={kind}", f"--src={src}", f"--out={out}", f"--heads={HEADS}", *extra])
  with open(convert.settings_path(out)) as f:
    return teacher_weights.read(out), json.load(f)


def _flax(params, record, z, t, labels, **overrides):
  module = dit.from_settings(record["settings"]).clone(**overrides)
  out = module.apply({"params": params}, jnp.asarray(z.transpose(0, 2, 3, 1)), jnp.asarray(t),
                     jnp.asarray(labels, jnp.int32))
  return np.asarray(out).transpose(0, 3, 1, 2)


def _relative(got, want):
  return float(np.abs(got - want).max() / np.abs(want).max())


def _torch_out(model, z, t, labels):
  with torch.no_grad():
    out = model(torch.from_numpy(z), torch.from_numpy(t), torch.from_numpy(labels))
  return (out.sample if hasattr(out, "sample") else out).numpy()


def _diffusers_as_paper_names(model):
  """A diffusers DiT's weights under the authors' names (the inverse of diffusers' script)."""
  sd = {k: v.detach().clone() for k, v in model.state_dict().items()}
  out = {"x_embedder.proj.weight": sd["pos_embed.proj.weight"],
         "x_embedder.proj.bias": sd["pos_embed.proj.bias"],
         "final_layer.adaLN_modulation.1.weight": sd["proj_out_1.weight"],
         "final_layer.adaLN_modulation.1.bias": sd["proj_out_1.bias"],
         "final_layer.linear.weight": sd["proj_out_2.weight"],
         "final_layer.linear.bias": sd["proj_out_2.bias"]}
  emb = "transformer_blocks.0.norm1.emb."
  for leaf in ("weight", "bias"):
    out[f"t_embedder.mlp.0.{leaf}"] = sd[emb + f"timestep_embedder.linear_1.{leaf}"]
    out[f"t_embedder.mlp.2.{leaf}"] = sd[emb + f"timestep_embedder.linear_2.{leaf}"]
  out["y_embedder.embedding_table.weight"] = sd[emb + "class_embedder.embedding_table.weight"]
  for i in range(LAYERS):
    b, o = f"transformer_blocks.{i}.", f"blocks.{i}."
    for leaf in ("weight", "bias"):
      out[o + f"attn.qkv.{leaf}"] = torch.cat([sd[b + f"attn1.to_{x}.{leaf}"] for x in "qkv"])
      out[o + f"attn.proj.{leaf}"] = sd[b + f"attn1.to_out.0.{leaf}"]
      out[o + f"mlp.fc1.{leaf}"] = sd[b + f"ff.net.0.proj.{leaf}"]
      out[o + f"mlp.fc2.{leaf}"] = sd[b + f"ff.net.2.{leaf}"]
      out[o + f"adaLN_modulation.1.{leaf}"] = sd[b + f"norm1.linear.{leaf}"]
  grid = model.config.sample_size // model.config.patch_size
  out["pos_embed"] = PaperDiT.sincos(grid, WIDTH)[None]
  return out


# --- diffusers' DiT ----------------------------------------------------------------------------


@pytest.mark.parametrize("suffix,scan", [(".safetensors", True), (".pt", False)])
def test_diffusers_dit_matches_through_the_converter(tmp_path, suffix, scan):
  model = _diffusers_dit()
  params, record = _convert(tmp_path, model.state_dict(), suffix=suffix,
                            extra=["--forward=diffusers", f"--scan={str(scan).lower()}"])
  assert record["settings"]["learn_sigma"] and record["settings"]["num_heads"] == HEADS
  z, t, labels = _inputs()
  want = _torch_out(model, z, t, labels)
  got = _flax(params, record, z, t, labels, return_sigma=True)
  assert got.shape == want.shape == (3, 8, 8, 8)
  assert _relative(got, want) <= TOL, _relative(got, want)
  eps = _flax(params, record, z, t, labels)  # the teacher's call: the ε half
  np.testing.assert_array_equal(eps, got[:, :4])


def test_a_wrong_qkv_order_fails_the_comparison(tmp_path, monkeypatch):
  model = _diffusers_dit()
  monkeypatch.setattr(convert, "QKV_ORDER", ("to_k", "to_q", "to_v"))
  params, record = _convert(tmp_path, model.state_dict(), extra=["--forward=diffusers"])
  z, t, labels = _inputs()
  got = _flax(params, record, z, t, labels, return_sigma=True)
  assert _relative(got, _torch_out(model, z, t, labels)) > 1e-2


def test_the_forwards_differ_so_the_flag_matters(tmp_path):
  """diffusers' timestep frequencies and MLP-norm eps are not the authors': converted with the
  authors' forward, diffusers' model is not matched."""
  model = _diffusers_dit()
  params, record = _convert(tmp_path, model.state_dict())
  assert record["settings"]["time_freq_shift"] == 0.0
  z, t, labels = _inputs()
  assert _relative(_flax(params, record, z, t, labels, return_sigma=True),
                   _torch_out(model, z, t, labels)) > 1e-3


# --- the authors' names ------------------------------------------------------------------------


def test_the_paper_dit_written_here_is_diffusers_dit():
  """The re-implementation, given diffusers' weights and its variant of the forward, is
  diffusers' model: what makes it a reference for the authors' naming."""
  model = _diffusers_dit()
  paper = PaperDiT(freq_shift=1.0, mlp_eps=1e-5).eval()
  paper.load_state_dict(_diffusers_as_paper_names(model), strict=True)
  z, t, labels = _inputs()
  assert _relative(_torch_out(paper, z, t, labels), _torch_out(model, z, t, labels)) <= 1e-5


@pytest.mark.parametrize("kind,learn_sigma", [("dit", True), ("sit", True), ("sit", False)])
def test_the_authors_names_match_through_the_converter(tmp_path, kind, learn_sigma):
  torch.manual_seed(1)
  paper = PaperDiT(learn_sigma=learn_sigma).eval()
  with torch.no_grad():
    for name, p in paper.named_parameters():
      if name != "pos_embed":
        p.add_(0.05 * torch.randn_like(p))
  params, record = _convert(tmp_path, paper.state_dict(), kind=kind, suffix=".pt")
  assert record["settings"]["learn_sigma"] == learn_sigma
  assert record["settings"]["input_size"] == 8
  assert record["teacher"] == convert.TEACHER_KEYS[kind]
  z, t, labels = _inputs()
  if kind == "sit":
    t = np.asarray([0.0, 0.3, 1.0], np.float32)  # SiT's time: 0 the noise, 1 the data
  want = _torch_out(paper, z, t, labels)[:, :4]  # ε (DiT) or the velocity (SiT)
  got = _flax(params, record, z, t, labels)
  assert got.shape == z.shape
  assert _relative(got, want) <= TOL, _relative(got, want)


def test_both_namings_convert_to_the_same_variables():
  model = _diffusers_dit()
  diffusers_sd = {k: v.numpy() for k, v in model.state_dict().items()}
  paper_sd = {k: v.numpy() for k, v in _diffusers_as_paper_names(model).items()}
  settings_a, a = convert.convert_dit(diffusers_sd, heads=HEADS)
  settings_b, b = convert.convert_dit(paper_sd, heads=HEADS)
  settings_b.pop("input_size")
  assert settings_a == settings_b and a.keys() == b.keys()
  for key in a:
    np.testing.assert_array_equal(a[key], b[key], err_msg=key)


# --- presets, factories ------------------------------------------------------------------------


def _param_count(module, channels=4):
  shapes = jax.eval_shape(module.init, jax.random.PRNGKey(0), jnp.zeros((1, 32, 32, channels)),
                          jnp.zeros((1,)), jnp.zeros((1,), jnp.int32))
  return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(shapes))


@pytest.mark.parametrize("size,patch", [("S", 8), ("XL", 2)])
def test_presets_have_diffusers_parameter_counts(size, patch):
  """DiT-XL/2 is diffusers' published config (28 x 16 heads of 72) less the 27 copies of the
  embeddings diffusers keeps per block; S/8 likewise from the paper's sizes."""
  depth, width, heads = dit.SIZES[size]
  with torch.device("meta"):
    model = DiTTransformer2DModel(num_attention_heads=heads, attention_head_dim=width // heads,
                                  in_channels=4, out_channels=8, num_layers=depth,
                                  sample_size=32, patch_size=patch, num_embeds_ada_norm=1000)
  total = sum(p.numel() for p in model.parameters())
  copies = sum(p.numel() for p in model.transformer_blocks[0].norm1.emb.parameters())
  factory = getattr(dit, f"dit_{size.lower()}_{patch}")
  assert _param_count(factory()) == total - (depth - 1) * copies
  if (size, patch) == ("XL", 2):
    assert round(_param_count(factory()) / 1e6) == 675  # the paper's Table 4


def test_a_converted_preset_names_its_factory():
  paper = PaperDiT(channels=4, width=384, depth=12, heads=6, classes=1000, patch=8, size=32)
  sd = {k: v.detach().numpy() for k, v in paper.state_dict().items()}
  settings, _ = convert.convert_dit(sd, size="S/8")
  assert convert.factory_of("sit", settings) == "multistep_cm.models.dit:sit_s_8"
  settings, _ = convert.convert_dit(sd, forward="diffusers")
  assert convert.factory_of("dit", settings) is None


# --- refusals ----------------------------------------------------------------------------------


def _refused(tmp_path, capsys, state_dict, *fragments, kind="dit", extra=()):
  src = _save(tmp_path, state_dict, ".safetensors")
  with pytest.raises(SystemExit) as info:
    convert.main([f"--from={kind}", f"--src={src}", f"--out={tmp_path / 'o.safetensors'}",
                  f"--heads={HEADS}", *extra])
  assert info.value.code == 2
  err = capsys.readouterr().err
  assert err.count("\n") == 1 and err.startswith("convert: error: "), err
  for fragment in fragments:
    assert fragment in err, (fragment, err)
  assert not (tmp_path / "o.safetensors").exists()


def test_bad_sources_are_refused_in_one_line(tmp_path, capsys):
  sd = _diffusers_dit().state_dict()
  _refused(tmp_path, capsys, {**sd, "transformer_blocks.0.extra.weight": torch.zeros(1)},
           "unknown key transformer_blocks.0.extra.weight")
  _refused(tmp_path, capsys, {k: v for k, v in sd.items() if "ff.net.2.bias" not in k},
           "missing blocks.0.mlp.fc2.bias")
  _refused(tmp_path, capsys, {**sd, "proj_out_1.bias": torch.zeros(3)},
           "final_layer.adaLN_modulation.1.bias: shape (3,)")
  _refused(tmp_path, capsys, {k: v for k, v in sd.items() if "to_k.weight" not in k},
           "missing transformer_blocks.0.attn1.to_k.weight")
  changed = dict(sd)
  name = "transformer_blocks.1.norm1.emb.timestep_embedder.linear_1.bias"
  changed[name] = changed[name] + 1
  _refused(tmp_path, capsys, changed, f"{name} differs from block 0's")
  _refused(tmp_path, capsys, sd, "--size=XL/2: the state dict has depth 2", extra=["--size=XL/2"])
  _refused(tmp_path, capsys, sd, "SiT is published with the authors' names", kind="sit")
  paper = {k: v.detach() for k, v in PaperDiT().state_dict().items()}
  _refused(tmp_path, capsys, {**paper, "blocks.0.attn.extra": torch.zeros(1)},
           "unknown key blocks.0.attn.extra")
  _refused(tmp_path, capsys, {**paper, "pos_embed": paper["pos_embed"] + 1},
           "pos_embed is not DiT's fixed sine-cosine embedding")
  _refused(tmp_path, capsys, {k: v for k, v in paper.items() if k != "x_embedder.proj.weight"},
           "missing x_embedder.proj.weight")


def test_a_source_that_is_not_a_state_dict_is_refused(tmp_path, capsys):
  src = tmp_path / "notes.pt"
  torch.save([1, 2, 3], str(src))
  with pytest.raises(SystemExit) as info:
    convert.main(["--from=dit", f"--src={src}", f"--out={tmp_path / 'o.npz'}"])
  assert info.value.code == 2
  assert "holds a list, not a state dict" in capsys.readouterr().err


# --- precision, remat, sharding ---------------------------------------------------------------


def _tiny(**overrides):
  return dit.DiT(patch_size=2, hidden_size=WIDTH, depth=LAYERS, num_heads=HEADS,
                 num_classes=CLASSES, **overrides)


def _random_params():
  """A random diffusers DiT's weights, converted (no Flax init to compile)."""
  sd = {k: v.numpy() for k, v in _diffusers_dit().state_dict().items()}
  flat = convert.convert_dit(sd, heads=HEADS)[1]
  return jax.tree.map(jnp.asarray, tree_io.unflatten(flat))


def test_bfloat16_and_remat_change_only_rounding():
  params = _random_params()
  z, t, labels = _inputs()
  args = (jnp.asarray(z.transpose(0, 2, 3, 1)), jnp.asarray(t), jnp.asarray(labels, jnp.int32))
  want = np.asarray(jax.jit(_tiny().apply)({"params": params}, *args))
  half = np.asarray(jax.jit(_tiny(dtype=jnp.bfloat16).apply)({"params": params}, *args))
  assert half.dtype == np.float32 and 1e-4 < _relative(half, want) < 5e-2

  def loss(p, module):
    return jnp.mean(module.apply({"params": p}, *args) ** 2)

  grad = jax.jit(jax.grad(loss), static_argnums=1)
  plain = grad(params, _tiny())
  remat = grad(params, _tiny(remat=True, remat_policy="dense_and_conv_saveable"))
  for a, b in zip(jax.tree.leaves(plain), jax.tree.leaves(remat)):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7)


def test_every_weight_has_one_sharded_axis():
  """The FSDP rule (models/partitioning.py): each kernel and embedding has exactly one axis
  named 'embed' or 'cond', and the scanned stack's leading axis is 'layers'."""
  boxed = jax.eval_shape(_tiny().init, jax.random.PRNGKey(0), jnp.zeros((1, 8, 8, 4)),
                         jnp.zeros((1,)), jnp.zeros((1,), jnp.int32))["params"]
  flat = {"/".join(str(getattr(k, "key", k)) for k in path): leaf for path, leaf in
          jax.tree_util.tree_flatten_with_path(
              boxed, is_leaf=lambda x: isinstance(x, nn.LogicallyPartitioned))[0]}
  assert len(flat) == 21
  for path, leaf in flat.items():
    assert isinstance(leaf, nn.LogicallyPartitioned), path
    if path.startswith("blocks/"):
      assert leaf.names[0] == "layers", path
    if path.endswith(("kernel", "embedding")):
      assert sum(n in ("embed", "cond") for n in leaf.names) == 1, (path, leaf.names)
