"""EDM's ADM UNet in Flax (models/adm.py) against a PyTorch network written here.

No maintained library ships EDM's `DhariwalUNet`; tests/torch_adm.py writes one in
PyTorch, independently, with EDM's state-dict names and random weights. Its state dict goes
through `params_from_state_dict`, and D(x; σ) must agree to 1e-4 relative in float32.
"""
from flax import traverse_util
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from multistep_cm.models import adm
from torch_adm import TorchADM

TINY = dict(img_resolution=16, in_channels=3, out_channels=3, label_dim=5, model_channels=32,
            channel_mult=(1, 2), channel_mult_emb=2, num_blocks=1, attn_resolutions=(8,),
            dropout=0.0)


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
  shapes = nn.meta.unbox(shapes["params"])
  assert jax.tree.structure(shapes) == jax.tree.structure(params)
  assert jax.tree.map(lambda a: a.shape, shapes) == jax.tree.map(np.shape, params)
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
  count = sum(int(np.prod(a.shape)) for a in jax.tree.leaves(nn.meta.unbox(shapes)))
  assert round(count / 1e6, 1) == 295.9  # the EDM paper's ImageNet-64 ADM: 295.9M
  # Every weight is FSDP-shardable: its output channels are the logical 'embed' axis.
  boxed = jax.tree.leaves(shapes, is_leaf=lambda a: isinstance(a, nn.LogicallyPartitioned))
  named = [a for a in boxed if isinstance(a, nn.LogicallyPartitioned)]
  assert all(a.names[-1] == "embed" for a in named) and len(named) > len(boxed) // 2
  with pytest.raises(ValueError, match="'model.something' is not a parameter"):
    adm.params_from_state_dict({"model.something": np.zeros(3)})


def test_the_converter_reads_the_settings_and_refuses_what_does_not_fit(pair, tmp_path):
  from multistep_cm import convert  # pylint: disable=g-import-not-at-top
  _, state = pair
  settings, flat = convert.convert_edm(state)
  assert settings == {k: list(v) if isinstance(v, tuple) else v for k, v in TINY.items()
                      if k != "dropout"}
  assert set(flat) == set(traverse_util.flatten_dict(adm.params_from_state_dict(state),
                                                     sep="/"))
  published = {k: list(v) if isinstance(v, tuple) else v
               for k, v in adm.IMAGENET64_COND.items()}
  assert settings != published
  broken = {k: v for k, v in state.items() if not k.endswith("dec.8x8_in1.conv1.weight")}
  with pytest.raises(convert.ConversionError, match="dec_8x8_in1/conv1/conv/kernel is missing"):
    convert.convert_edm(broken)
  with pytest.raises(convert.ConversionError, match="not an EDM ADM UNet state dict"):
    convert.convert_edm({"weight": np.zeros(3)})
