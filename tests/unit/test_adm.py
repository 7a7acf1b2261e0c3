"""EDM's ADM UNet in Flax (models/adm.py) against a PyTorch network written here.

No maintained library ships EDM's `DhariwalUNet`, so this file writes one in PyTorch from
the EDM paper and the structure of its published code, with the state-dict names of
EDM's checkpoints (`model.enc.16x16_block0.conv0.weight`, the resampling filters as
buffers). Its computation is written independently of the Flax network: resampling by
strided and transposed convolutions with the [1, 1] filter, attention in EDM's
`[N * heads, C / heads, 3, HW]` layout, NCHW throughout. All weights are random (EDM
zero-initialises some layers; here none is zero, so every parameter matters). The state
dict goes through `params_from_state_dict`, and D(x; σ) must agree to 1e-4 relative in
float32.
"""
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from multistep_cm.models import adm

TINY = dict(img_resolution=16, in_channels=3, out_channels=3, label_dim=5, model_channels=32,
            channel_mult=(1, 2), channel_mult_emb=2, num_blocks=1, attn_resolutions=(8,),
            dropout=0.0)


class TorchConv(torch.nn.Module):
  def __init__(self, cin, cout, kernel, up=False, down=False):
    super().__init__()
    self.up, self.down, self.kernel, self.cin, self.cout = up, down, kernel, cin, cout
    if kernel:
      self.weight = torch.nn.Parameter(torch.randn(cout, cin, kernel, kernel) * 0.2)
      self.bias = torch.nn.Parameter(torch.randn(cout) * 0.2)
    f = torch.tensor([1.0, 1.0])
    f = torch.outer(f, f)[None, None] / f.sum() ** 2
    self.register_buffer("resample_filter", f if up or down else None)

  def forward(self, x):
    if self.up:
      x = F.conv_transpose2d(x, (self.resample_filter * 4).tile([x.shape[1], 1, 1, 1]),
                             groups=x.shape[1], stride=2)
    if self.down:
      x = F.conv2d(x, self.resample_filter.tile([x.shape[1], 1, 1, 1]), groups=x.shape[1],
                   stride=2)
    if self.kernel:
      x = F.conv2d(x, self.weight, self.bias, padding=self.kernel // 2)
    return x


class TorchNorm(torch.nn.Module):
  def __init__(self, channels):
    super().__init__()
    self.groups = min(32, channels // 4)
    self.weight = torch.nn.Parameter(1 + torch.randn(channels) * 0.2)
    self.bias = torch.nn.Parameter(torch.randn(channels) * 0.2)

  def forward(self, x):
    return F.group_norm(x, self.groups, self.weight, self.bias, eps=1e-5)


class TorchLinear(torch.nn.Module):
  def __init__(self, cin, cout, bias=True):
    super().__init__()
    self.weight = torch.nn.Parameter(torch.randn(cout, cin) / math.sqrt(cin))
    self.bias = torch.nn.Parameter(torch.randn(cout) * 0.2) if bias else None

  def forward(self, x):
    return F.linear(x, self.weight, self.bias)


class TorchBlock(torch.nn.Module):
  def __init__(self, cin, cout, emb, up=False, down=False, attention=False):
    super().__init__()
    self.heads = cout // 64 if attention else 0
    self.norm0, self.conv0 = TorchNorm(cin), TorchConv(cin, cout, 3, up, down)
    self.affine = TorchLinear(emb, 2 * cout)
    self.norm1, self.conv1 = TorchNorm(cout), TorchConv(cout, cout, 3)
    self.skip = None
    if cout != cin or up or down:
      self.skip = TorchConv(cin, cout, 1 if cout != cin else 0, up, down)
    if self.heads:
      self.norm2 = TorchNorm(cout)
      self.qkv, self.proj = TorchConv(cout, 3 * cout, 1), TorchConv(cout, cout, 1)

  def forward(self, x, emb):
    orig = x
    x = self.conv0(F.silu(self.norm0(x)))
    scale, shift = self.affine(emb)[:, :, None, None].chunk(2, dim=1)
    x = F.silu(shift + self.norm1(x) * (scale + 1))
    x = self.conv1(x) + (self.skip(orig) if self.skip is not None else orig)
    if self.heads:
      n, c, h, w = x.shape
      q, k, v = self.qkv(self.norm2(x)).reshape(n * self.heads, c // self.heads, 3,
                                                 h * w).unbind(2)
      weights = torch.einsum("ncq,nck->nqk", q, k / math.sqrt(k.shape[1])).softmax(dim=2)
      x = self.proj(torch.einsum("nqk,nck->ncq", weights, v).reshape(n, c, h, w)) + x
    return x


class TorchADM(torch.nn.Module):
  """DhariwalUNet inside EDMPrecond, with EDM's module names."""

  def __init__(self, img_resolution, in_channels, out_channels, label_dim, model_channels,
               channel_mult, channel_mult_emb, num_blocks, attn_resolutions, dropout):
    super().__init__()
    del dropout
    self.model = torch.nn.Module()
    m, emb = self.model, model_channels * channel_mult_emb
    self.label_dim, self.channels = label_dim, model_channels
    m.map_layer0 = TorchLinear(model_channels, emb)
    m.map_layer1 = TorchLinear(emb, emb)
    m.map_label = TorchLinear(label_dim, emb, bias=False)
    m.enc, m.dec = torch.nn.ModuleDict(), torch.nn.ModuleDict()
    cout, skips = in_channels, []
    for level, mult in enumerate(channel_mult):
      res = img_resolution >> level
      if level == 0:
        m.enc[f"{res}x{res}_conv"] = TorchConv(cout, model_channels * mult, 3)
        cout = model_channels * mult
      else:
        m.enc[f"{res}x{res}_down"] = TorchBlock(cout, cout, emb, down=True)
      skips.append(cout)
      for idx in range(num_blocks):
        m.enc[f"{res}x{res}_block{idx}"] = TorchBlock(cout, model_channels * mult, emb,
                                                      attention=res in attn_resolutions)
        cout = model_channels * mult
        skips.append(cout)
    for level, mult in reversed(list(enumerate(channel_mult))):
      res = img_resolution >> level
      if level == len(channel_mult) - 1:
        m.dec[f"{res}x{res}_in0"] = TorchBlock(cout, cout, emb, attention=True)
        m.dec[f"{res}x{res}_in1"] = TorchBlock(cout, cout, emb)
      else:
        m.dec[f"{res}x{res}_up"] = TorchBlock(cout, cout, emb, up=True)
      for idx in range(num_blocks + 1):
        m.dec[f"{res}x{res}_block{idx}"] = TorchBlock(cout + skips.pop(), model_channels * mult,
                                                      emb, attention=res in attn_resolutions)
        cout = model_channels * mult
    m.out_norm, m.out_conv = TorchNorm(cout), TorchConv(cout, out_channels, 3)

  def forward(self, x, sigma, one_hot):
    m, s = self.model, sigma.reshape(-1, 1, 1, 1)
    c_skip, c_out = 0.25 / (s ** 2 + 0.25), s * 0.5 / (s ** 2 + 0.25).sqrt()
    c_in = 1 / (0.25 + s ** 2).sqrt()
    half = self.channels // 2
    freqs = (1 / 10000) ** (torch.arange(half, dtype=torch.float32) / half)
    angles = torch.outer((sigma.log() / 4), freqs)
    emb = torch.cat([angles.cos(), angles.sin()], dim=1)
    emb = m.map_layer1(F.silu(m.map_layer0(emb)))
    emb = F.silu(emb + m.map_label(one_hot))
    h, skips = c_in * x, []
    for block in m.enc.values():
      h = block(h, emb) if isinstance(block, TorchBlock) else block(h)
      skips.append(h)
    for name, block in m.dec.items():
      if "_block" in name:
        h = torch.cat([h, skips.pop()], dim=1)
      h = block(h, emb)
    f_x = m.out_conv(F.silu(m.out_norm(h)))
    return c_skip * x + c_out * f_x


@pytest.fixture(scope="module")
def pair():
  torch.manual_seed(0)
  reference = TorchADM(**TINY).eval()
  state = {k: v.detach().numpy() for k, v in reference.state_dict().items()}
  return reference, state


def test_the_converted_network_is_edms(pair):
  reference, state = pair
  teacher = adm.EDMTeacher(adm.ADMUNet(**TINY))
  params = adm.params_from_state_dict(state)
  rng = np.random.default_rng(1)
  x = rng.normal(size=(4, 3, 16, 16)).astype(np.float32) * 2
  sigma = np.array([0.01, 0.5, 3.0, 60.0], np.float32)
  labels = np.array([0, 3, 4, 5])  # the last is the null class: the zero vector
  one_hot = np.eye(TINY["label_dim"], dtype=np.float32)[np.minimum(labels, 4)]
  one_hot[labels == TINY["label_dim"]] = 0.0
  with torch.no_grad():
    want = reference(torch.from_numpy(x), torch.from_numpy(sigma),
                     torch.from_numpy(one_hot)).numpy().transpose(0, 2, 3, 1)
  got = np.asarray(teacher.apply({"params": params}, jnp.asarray(x.transpose(0, 2, 3, 1)),
                                 jnp.asarray(sigma), jnp.asarray(labels)))
  # Every parameter of the Flax network was given by the state dict (none left at init).
  shapes = jax.eval_shape(lambda: teacher.init(jax.random.PRNGKey(0), jnp.zeros((1, 16, 16, 3)),
                                               jnp.ones((1,)), jnp.zeros((1,), jnp.int32)))
  assert jax.tree.structure(shapes["params"]) == jax.tree.structure(params)
  assert jax.tree.map(lambda a: a.shape, shapes["params"]) == jax.tree.map(np.shape, params)
  for i in range(4):  # per example: each σ is its own scale
    error = np.linalg.norm(got[i] - want[i]) / np.linalg.norm(want[i])
    assert error < 1e-4, (i, error)


def test_a_wrong_mapping_is_caught(pair):
  """The comparison can fail: the qkv channels in another order give other outputs."""
  reference, state = pair
  name = next(k for k in state if k.endswith("qkv.weight"))
  broken = dict(state)
  w = state[name]
  broken[name] = w.reshape(-1, 3, *w.shape[1:]).transpose(1, 0, 2, 3, 4).reshape(w.shape)
  teacher = adm.EDMTeacher(adm.ADMUNet(**TINY))
  x = jnp.asarray(np.random.default_rng(2).normal(size=(2, 16, 16, 3)), jnp.float32)
  sigma, labels = jnp.asarray([0.5, 2.0]), jnp.asarray([1, 2])
  a = teacher.apply({"params": adm.params_from_state_dict(state)}, x, sigma, labels)
  b = teacher.apply({"params": adm.params_from_state_dict(broken)}, x, sigma, labels)
  assert float(jnp.max(jnp.abs(a - b))) > 1e-3
  del reference


def test_the_published_size_and_bad_keys():
  teacher = adm.edm_imagenet64_cond()
  shapes = jax.eval_shape(lambda: teacher.init(jax.random.PRNGKey(0), jnp.zeros((1, 64, 64, 3)),
                                               jnp.ones((1,)), jnp.zeros((1,), jnp.int32)))
  count = sum(int(np.prod(a.shape)) for a in jax.tree.leaves(shapes))
  assert round(count / 1e6, 1) == 295.9  # the EDM paper's ImageNet-64 ADM: 295.9M
  with pytest.raises(ValueError, match="'model.something' is not a parameter"):
    adm.params_from_state_dict({"model.something": np.zeros(3)})
