"""Text conditioning of the UViT (§15.2, §15.3): both routes, padding, null text, equivalences.

All on the `digits8_text` preset (8x8, a two-block mid stack, 8 tokens of width 64) with
random parameters (test_models._random_params: nothing zero, so the zero-initialised output
layers do not make every comparison vacuous). The identities tested hold by construction:
masked tokens get weight 0 in both routes, a cross-attention block whose output projection
is zero adds nothing, and a scanned stack is its unrolled blocks.
"""
import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from multistep_cm import models
from multistep_cm.models import partitioning
from multistep_cm.models import uvit
from multistep_cm.runtime import sharding as sharding_lib
from test_models import _random_params

PRESET = "digits8_text"
BATCH = 8  # the 2x4 mesh's batch axes
LENGTHS = (8, 5, 1, 3, 0, 8, 2, 6)  # real tokens per row; row 4 is the null caption
CROSS_PARAMS = ("cross_q", "cross_kv", "cross_out", "norm_cross_film")


def _rel_err(a, b):
  return float(jnp.linalg.norm(a - b) / jnp.linalg.norm(b))


def _text(length, width, seed=2):
  rng = np.random.default_rng(seed)
  embedding = rng.normal(size=(BATCH, length, width)).astype(np.float32)
  mask = (np.arange(length)[None, :] < np.asarray(LENGTHS)[:, None]).astype(np.int32)
  return {"text_embedding": embedding, "text_mask": mask}


@functools.lru_cache(maxsize=None)
def _setup(**overrides):
  """(model, random params, (z, logsnr, text)) for digits8_text with `overrides`."""
  model = models.get_model(PRESET, **overrides)
  rng = np.random.default_rng(1)
  z = jnp.asarray(rng.normal(size=(BATCH, 8, 8, 1)), jnp.float32)
  logsnr = jnp.asarray(rng.uniform(-10.0, 10.0, size=BATCH), jnp.float32)
  text = _text(model.text_len, model.text_dim)
  return model, _random_params(model, (z, logsnr, text)), (z, logsnr, text)


@functools.lru_cache(maxsize=None)
def _forward(model):
  return jax.jit(lambda p, z, logsnr, text: model.apply({"params": p}, z, logsnr, text))


def _run(model, params, z, logsnr, text):
  return np.asarray(_forward(model)(params, z, logsnr, text))


def _with_padding(text, value):
  """`text` with every padding position's embedding set to `value`."""
  padding = text["text_mask"][..., None] == 0
  return dict(text, text_embedding=np.where(padding, value, text["text_embedding"]))


@pytest.mark.parametrize("route", ["pooled", "cross_attention"])
def test_text_changes_the_output_of_its_row_only(route):
  model, params, (z, logsnr, text) = _setup(text_route=route)
  base = _run(model, params, z, logsnr, text)
  other = dict(text, text_embedding=text["text_embedding"].copy())
  other["text_embedding"][0] = np.random.default_rng(5).normal(size=(8, 64))
  changed = _run(model, params, z, logsnr, other)
  assert _rel_err(changed[0], base[0]) > 1e-2
  np.testing.assert_array_equal(changed[1:], base[1:])  # rows are independent


@pytest.mark.parametrize("route", ["pooled", "cross_attention"])
def test_padding_does_not_change_the_output(route):
  model, params, (z, logsnr, text) = _setup(text_route=route)
  base = _run(model, params, z, logsnr, text)
  # Other padding values, even non-finite ones: bit for bit the same output.
  for value in (1e4, np.nan):
    np.testing.assert_array_equal(_run(model, params, z, logsnr, _with_padding(text, value)),
                                  base)
  # Three more padding positions (L -> L + 3, mask 0): the same up to summation order.
  longer = _text(model.text_len + 3, model.text_dim, seed=7)
  longer["text_embedding"][:, :model.text_len] = text["text_embedding"]
  np.testing.assert_array_equal(longer["text_mask"][:, :model.text_len], text["text_mask"])
  np.testing.assert_allclose(_run(model, params, z, logsnr, longer), base,
                             rtol=1e-5, atol=1e-6)


def test_null_text_is_finite_learned_and_ignores_the_embedding():
  model, params, (z, logsnr, text) = _setup()
  assert model.text_route == "both"
  null = dict(text, text_mask=np.zeros_like(text["text_mask"]))
  out = _run(model, params, z, logsnr, null)
  assert np.all(np.isfinite(out))
  np.testing.assert_array_equal(
      _run(model, params, z, logsnr, dict(null, text_embedding=-3 * text["text_embedding"])),
      out)
  # None is the null conditioning too, as for class models.
  np.testing.assert_allclose(_run(model, params, z, logsnr, None), out, rtol=1e-5, atol=1e-6)
  # Row 4 has no tokens in `text` as well; the other rows' captions matter.
  conditional = _run(model, params, z, logsnr, text)
  np.testing.assert_array_equal(conditional[4], out[4])
  assert _rel_err(conditional[0], out[0]) > 1e-2
  # The learned nulls are what the null caption sees: changing them changes its output.
  moved = jax.tree.map(lambda a: a, params)
  moved["cond"]["text_pool"]["null"] = params["cond"]["text_pool"]["null"] + 1.0
  assert _rel_err(_run(model, moved, z, logsnr, null)[4], out[4]) > 1e-3
  moved = jax.tree.map(lambda a: a, params)
  moved["text_context"]["null"] = params["text_context"]["null"] + 1.0
  assert _rel_err(_run(model, moved, z, logsnr, null)[4], out[4]) > 1e-3


def test_zero_cross_attention_output_is_the_unconditional_model():
  """A cross-attention block starts as the identity (zero `cross_out`): at that point the
  cross-route model ignores its text and equals the unconditional UViT on the other
  parameters; moving `cross_out` off zero makes the text matter."""
  model, params, (z, logsnr, text) = _setup(text_route="cross_attention")
  zeroed = jax.tree.map(lambda a: a, params)
  zeroed["mid"]["layers"]["cross_out"] = jax.tree.map(jnp.zeros_like,
                                                      params["mid"]["layers"]["cross_out"])
  out = _run(model, zeroed, z, logsnr, text)
  other = dict(text, text_embedding=text["text_embedding"][::-1].copy())
  np.testing.assert_array_equal(_run(model, zeroed, z, logsnr, other), out)

  unconditional = models.get_model(PRESET, text_dim=0, text_len=0)
  plain = {k: v for k, v in zeroed.items() if k != "text_context"}
  plain["mid"] = {"layers": {k: v for k, v in zeroed["mid"]["layers"].items()
                             if k not in CROSS_PARAMS}}
  expected = jax.eval_shape(unconditional.init, {"params": jax.random.key(0)}, z, logsnr)
  assert (jax.tree.structure(partitioning.unbox(expected["params"]))
          == jax.tree.structure(plain))
  np.testing.assert_allclose(_run(unconditional, plain, z, logsnr, None), out,
                             rtol=1e-5, atol=1e-6)
  assert _rel_err(_run(model, params, z, logsnr, other), _run(model, params, z, logsnr, text)
                  ) > 1e-2


def test_scanned_and_unrolled_text_model_agree():
  scanned, params, (z, logsnr, text) = _setup()
  unrolled = models.get_model(PRESET, scan_blocks=False)
  unrolled_params = uvit.unstack_layers(params)
  expected = jax.eval_shape(unrolled.init, {"params": jax.random.key(0)}, z, logsnr, text)
  assert (jax.tree.structure(partitioning.unbox(expected["params"]))
          == jax.tree.structure(unrolled_params))
  np.testing.assert_allclose(_run(unrolled, unrolled_params, z, logsnr, text),
                             _run(scanned, params, z, logsnr, text), rtol=1e-5, atol=1e-5)


def test_bfloat16_text_model_agrees():
  model, params, (z, logsnr, text) = _setup()
  # bfloat16 rounding of ~20 layers: ~1% (test_models.BF16_RTOL explains the 5% bound).
  bf16 = models.get_model(PRESET, dtype="bfloat16")
  assert _rel_err(_run(bf16, params, z, logsnr, text), _run(model, params, z, logsnr, text)
                  ) < 5e-2


def test_remat_cross_attention_stack_same_gradients():
  """The scanned mid stack with cross-attention, rematerialised: the same gradients (for
  the parameters, the activations and the text context) as without remat. On the stack
  alone: compiling the whole UViT's gradient twice costs ~15 s on two cores."""
  rng = np.random.default_rng(3)
  x = jnp.asarray(rng.normal(size=(2, 4, 4, 64)), jnp.float32)
  cond = jnp.asarray(rng.normal(size=(2, 32)), jnp.float32)
  context = jnp.asarray(rng.normal(size=(2, 5, 64)), jnp.float32)
  mask = jnp.asarray([[1, 1, 1, 0, 0], [1, 0, 0, 0, 0]], bool)
  stack = functools.partial(uvit.TransformerStack, 2, 64, head_dim=32, cross_attention=True)
  params = _random_params(stack(), (x, cond, context, mask))

  def grad(module):
    loss = lambda p, x, c: jnp.sum(module.apply({"params": p}, x, cond, c, mask) ** 2)
    return jax.jit(jax.grad(loss, argnums=(0, 1, 2)))

  rematted = stack(remat=True)
  assert "remat" in str(jax.make_jaxpr(grad(rematted))(params, x, context))
  expected = grad(stack())(params, x, context)
  assert float(jnp.linalg.norm(expected[2])) > 0  # the text reaches the output
  # Recomputing changes only the order of float32 roundings: agreement to ~1e-6 of each
  # gradient's scale (a wrong residual would be off by O(1)).
  jax.tree.map(lambda a, b: np.testing.assert_allclose(
      a, b, rtol=1e-5, atol=1e-5 * float(jnp.max(jnp.abs(b)))),
               grad(rematted)(params, x, context), expected)


def test_text_params_are_fsdp_sharded_and_the_sharded_forward_agrees():
  model, params, (z, logsnr, text) = _setup()
  mesh = sharding_lib.make_mesh(ml_collections.ConfigDict({"data": 2, "fsdp": 4}),
                                jax.devices()[:8])
  shardings = partitioning.param_shardings(models.abstract_variables(model)["params"], mesh)
  layer = shardings["mid"]["layers"]
  new = {"text_pool": shardings["cond"]["text_pool"], "text_context": shardings["text_context"],
         **{name: layer[name] for name in CROSS_PARAMS}}
  for path, sharding in jax.tree_util.tree_leaves_with_path(new):
    path, spec = jax.tree_util.keystr(path), tuple(sharding.spec)
    assert "data" not in spec, (path, spec)
    # Every weight (a kernel, a null vector) is FSDP-sharded on its one 'embed'/'cond' axis
    # (biases of the 'qkv'/'modulation' outputs stay replicated, as in the other blocks).
    if not path.endswith("['bias']"):
      assert spec.count("fsdp") == 1, (path, spec)
  assert tuple(shardings["text_context"]["proj"]["kernel"].spec) == (None, "fsdp")

  expected = _run(model, params, z, logsnr, text)
  sharded = jax.device_put(params, shardings)
  inputs = jax.tree.map(lambda x: jax.device_put(x, partitioning.batch_sharding(mesh, x.ndim)),
                        (z, logsnr, text))
  with jax.set_mesh(mesh), nn.logical_axis_rules(partitioning.LOGICAL_AXIS_RULES):
    out = _forward(model)(sharded, *inputs)
  assert out.sharding.spec[0] == ("data", "fsdp")
  np.testing.assert_allclose(out, expected, rtol=1e-4, atol=1e-4)


def test_text_config_errors_and_presets():
  for overrides, match in [
      ({"text_route": "film"}, "text_route must be one of"),
      ({"num_classes": 10}, "one kind of conditioning per model"),
      ({"text_len": 0}, "needs text_len >= 1"),
  ]:
    with pytest.raises(ValueError, match=match):
      models.get_model(PRESET, **overrides)
  model, _, (z, logsnr, text) = _setup()
  variables = models.abstract_variables(model)
  with pytest.raises(ValueError, match="takes labels="):
    jax.eval_shape(model.apply, variables, z, logsnr, jnp.zeros((BATCH,), jnp.int32))
  with pytest.raises(ValueError, match=r"text_embedding \(8, 8, 32\)"):
    jax.eval_shape(model.apply, variables, z, logsnr,
                   dict(text, text_embedding=text["text_embedding"][..., :32]))

  # dummy_inputs: the null caption at the model's text_len.
  _, _, null = models.dummy_inputs(model, 2)
  assert null["text_embedding"].shape == (2, 8, 64) and not null["text_mask"].any()
  # The data's text width and length reach the model, as num_classes does.
  config = ml_collections.ConfigDict({"model": {"preset": "digits8", "num_classes": 0},
                                      "data": {"num_classes": 0, "text_dim": 16,
                                               "text_len": 4}})
  built = models.get_model_for_config(config)
  assert (built.text_dim, built.text_len, built.num_classes) == (16, 4, 0)
  t2i = models.get_model("t2i_512")
  assert (t2i.text_dim, t2i.text_len, t2i.text_route) == (4096, 128, "both")
