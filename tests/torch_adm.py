"""EDM's ADM UNet (`DhariwalUNet` inside `EDMPrecond`) in PyTorch, written for the tests.

No maintained library ships EDM's network, so this is written from the EDM paper and the
structure of its published code. It has the state-dict names of EDM's checkpoints
(`model.enc.16x16_block0.conv0.weight`, the resampling filters as buffers). Its computation
is written independently of the Flax network in multistep_cm/models/adm.py: resampling by
strided and transposed convolutions with the [1, 1] filter, attention in EDM's
`[N * heads, C / heads, 3, HW]` layout, NCHW throughout. Every weight is random (EDM
zero-initialises some layers; here none is zero, so every parameter matters).
"""
import math

import torch
import torch.nn.functional as F


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
