"""The denoisers: shapes and parameter counts of every preset, equivalences on the small ones.

Big presets are only traced (`jax.eval_shape`, lowering); the small presets run
with random parameters (see `_random_params`): the output layers are
zero-initialised, and a network that outputs exactly 0 would make every
comparison below vacuous.
"""
import functools
import os

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from multistep_cm.config import base as config_base
from multistep_cm import models
from multistep_cm.models import partitioning
from multistep_cm.models import summary
from multistep_cm.models import uvit
from multistep_cm.runtime import flops
from multistep_cm.runtime import sharding as sharding_lib

SMALL_PRESETS = ("digits8", "digits16", "small32", "mlp_toy")
UVIT_SMALL = ("digits8", "digits16", "small32")
BATCH = 4
# bfloat16 vs float32, relative L2 error of v-hat with the same parameters. bfloat16 keeps 8
# significant bits (unit roundoff 2^-9 ~ 0.2%); every conv/matmul input is rounded, and the
# independent errors of the ~10-40 rounded layers of these presets add up roughly as the
# square root of their number, to 1-3% (measured: 0.8% mlp_toy to 1.3% digits16). 5% leaves
# margin for other seeds, while a broken precision path (a lost float32 norm or softmax, a
# wrong cast) is off by O(1).
BF16_RTOL = 5e-2


def _rel_err(a, b):
  return float(jnp.linalg.norm(a - b) / jnp.linalg.norm(b))


def _random_params(model, inputs, seed=0):
  """Random parameters with the shapes of `model.init`, drawn in numpy (nothing to compile).

  Kernels ~ N(0, 1/fan_in) like the default init, 1-D parameters (biases, norm
  scales) ~ N(0, 0.05^2) or 1 + N(0, 0.05^2); unlike `init`, nothing is zero, so
  the zero-initialised output layers do not make v-hat vanish.
  """
  abstract = jax.eval_shape(model.init, {"params": jax.random.key(0)}, *inputs)
  rng = np.random.default_rng(seed)

  def draw(path, leaf):
    path = jax.tree_util.keystr(path)
    dims = leaf.shape[1:] if "'layers'" in path else leaf.shape  # drop the scan axis
    if len(dims) >= 2:
      value = rng.normal(size=leaf.shape) / np.sqrt(np.prod(dims[:-1]))
    else:
      value = 0.05 * rng.normal(size=leaf.shape) + ("scale" in path)
    return jnp.asarray(value, jnp.float32)

  return jax.tree_util.tree_map_with_path(draw, partitioning.unbox(abstract["params"]))


@functools.lru_cache(maxsize=None)
def _setup(name: str, **overrides):
  """(model, random float32 params, (z, logsnr, labels)) for a small preset."""
  model = models.get_model(name, **dict(overrides))
  rng = np.random.default_rng(1)
  z_spec, _, _ = models.input_specs(model, BATCH)
  z = jnp.asarray(rng.normal(size=z_spec.shape), jnp.float32)
  logsnr = jnp.asarray(rng.uniform(-10.0, 10.0, size=BATCH), jnp.float32)
  labels = jnp.asarray(rng.integers(0, model.num_classes + 1, size=BATCH), jnp.int32)
  return model, _random_params(model, (z, logsnr, labels)), (z, logsnr, labels)


@functools.lru_cache(maxsize=None)
def _forward(model, train=False):
  return jax.jit(lambda p, inputs, key: model.apply(
      {"params": p}, *inputs, train=train, rngs={"dropout": key}))


@functools.lru_cache(maxsize=None)
def _grad(model):
  def loss(p, inputs, key):
    v_hat = model.apply({"params": p}, *inputs, train=True, rngs={"dropout": key})
    return jnp.mean(jnp.square(v_hat))
  return jax.jit(jax.grad(loss))


# ---- every preset, abstractly ----------------------------------------------------------

@pytest.mark.parametrize("name", sorted(models.PRESETS))
def test_preset_output_shape_and_param_count(name):
  model = models.get_model(name)
  inputs = models.input_specs(model, 2)
  variables = models.abstract_variables(model, batch=2)
  out = jax.eval_shape(lambda v, *x: model.apply(v, *x), variables, *inputs)
  assert out.shape == inputs[0].shape and out.dtype == jnp.float32
  count = models.param_count(model)
  leaves = jax.tree.leaves(partitioning.unbox(variables["params"]))
  assert count == sum(int(np.prod(p.shape)) for p in leaves)
  assert all(p.dtype == jnp.float32 for p in leaves)
  if name in models.PAPER_PARAMS:
    assert abs(count / models.PAPER_PARAMS[name] - 1) < 0.05, (name, count)
  elif name.startswith("digits"):
    assert count < 1.5e6  # small enough to train thousands of CPU steps in minutes


def test_bad_preset_and_override_name_what_is_allowed():
  with pytest.raises(ValueError, match="unknown model preset 'nope'.*digits8"):
    models.get_model("nope")
  with pytest.raises(ValueError, match="unknown model override 'widht'.*mid_channels"):
    models.get_model("digits8", widht=3)
  with pytest.raises(ValueError, match="'preset'"):
    models.get_model(ml_collections.ConfigDict({"dtype": "bfloat16"}))
  with pytest.raises(ValueError, match="remat_policy"):
    models.get_model("digits8", remat=True, remat_policy="sometimes")
  with pytest.raises(ValueError, match="image_size"):
    models.get_model("digits16", image_size=10)


def test_config_dict_overrides_and_dropout_placement():
  config = ml_collections.ConfigDict(
      dict(preset="imagenet64_large", dtype="bfloat16", dropout=0.3, scan_blocks=False))
  model = models.get_model(config, remat=True)
  assert model.dtype == jnp.bfloat16 and model.remat and not model.scan_blocks
  out = jax.eval_shape(
      lambda v, *x: model.apply(v, *x, train=True, rngs={"dropout": jax.random.key(0)}),
      models.abstract_variables(model), *models.input_specs(model, 1))
  assert out.dtype == jnp.float32
  # §7.2: large IN64 has dropout on all transformer levels, none on the 64x64 ResBlocks.
  assert model.dropout == (0.0, 0.3, 0.3)
  assert models.get_model("imagenet64_small").dropout == (0.0, 0.0, 0.2)
  assert models.get_model("imagenet128_large").dropout == (0.0, 0.1, 0.1, 0.1)


# ---- small presets, run ----------------------------------------------------------------

@pytest.mark.parametrize("name", SMALL_PRESETS)
def test_forward_backward_finite_and_bfloat16_agrees(name):
  model, params, inputs = _setup(name)
  key = jax.random.key(1)
  out = _forward(model)(params, inputs, key)
  assert out.shape == inputs[0].shape and out.dtype == jnp.float32
  assert bool(jnp.all(jnp.isfinite(out))) and float(jnp.std(out)) > 0.1

  grads = _grad(model)(params, inputs, key)
  norms = [float(jnp.linalg.norm(g)) for g in jax.tree.leaves(grads)]
  assert all(np.isfinite(norms)) and max(norms) > 0

  bf16 = models.get_model(name, dtype="bfloat16")
  out_bf16 = _forward(bf16)(params, inputs, key)
  assert out_bf16.dtype == jnp.float32
  assert _rel_err(out_bf16, out) < BF16_RTOL


@pytest.mark.parametrize("name", ("digits16", "mlp_toy"))
def test_eval_is_deterministic_and_dropout_is_keyed(name):
  model, params, inputs = _setup(name, dropout=0.2)
  evaluate, train = _forward(model), _forward(model, train=True)
  k1, k2 = jax.random.key(1), jax.random.key(2)
  np.testing.assert_array_equal(evaluate(params, inputs, k1), evaluate(params, inputs, k2))
  no_rngs = jax.jit(lambda p, x: model.apply({"params": p}, *x, train=False))
  np.testing.assert_array_equal(evaluate(params, inputs, k1), no_rngs(params, inputs))
  # Synchronised dropout: the mask is a function of the key only.
  np.testing.assert_array_equal(train(params, inputs, k1), train(params, inputs, k1))
  assert _rel_err(train(params, inputs, k1), train(params, inputs, k2)) > 1e-2
  assert _rel_err(train(params, inputs, k1), evaluate(params, inputs, k1)) > 1e-2


@pytest.mark.parametrize("name", ("digits16", "small32"))
def test_scanned_and_unrolled_blocks_agree(name):
  scanned, params, inputs = _setup(name)
  unrolled = models.get_model(name, scan_blocks=False)
  unrolled_params = uvit.unstack_layers(params)
  # The converted tree is exactly the tree the unrolled model initialises.
  expected = jax.eval_shape(unrolled.init, {"params": jax.random.key(0)}, *inputs)
  assert (jax.tree.structure(partitioning.unbox(expected["params"]))
          == jax.tree.structure(unrolled_params))
  jax.tree.map(np.testing.assert_array_equal,
               uvit.stack_layers(unrolled_params), params)
  key = jax.random.key(1)
  out_scanned = _forward(scanned)(params, inputs, key)
  out_unrolled = _forward(unrolled)(unrolled_params, inputs, key)
  np.testing.assert_allclose(out_unrolled, out_scanned, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("scan_blocks,policy", [
    (True, "nothing_saveable"), (False, "dots_with_no_batch_dims_saveable"),
    (True, "dense_and_conv_saveable"), (True, "nothing_saveable,dense_and_conv_saveable")])
def test_remat_changes_memory_not_gradients(scan_blocks, policy):
  model, params, inputs = _setup("digits8", scan_blocks=scan_blocks)
  rematted = models.get_model("digits8", scan_blocks=scan_blocks, remat=True,
                              remat_policy=policy)
  key = jax.random.key(1)

  def jaxpr(m):
    return str(jax.make_jaxpr(_grad(m))(params, inputs, key))

  assert "remat" in jaxpr(rematted) and "remat" not in jaxpr(model)
  jax.tree.map(functools.partial(np.testing.assert_allclose, rtol=1e-5, atol=1e-6),
               _grad(rematted)(params, inputs, key), _grad(model)(params, inputs, key))


def test_dense_and_conv_policy_recomputes_exactly_the_attention_matmuls():
  """`dense_and_conv_saveable` keeps every conv and dense output, so the backward pass
  recomputes only attention's two batched matmuls: per block and image, the logits
  QK^T and the weighted values AV, each 2 L^2 width FLOPs (L tokens; the heads split
  `width`). Counted on the gradient's jaxpr (`flops.count_flops`), hardware minus
  model FLOPs must be exactly that sum; `nothing_saveable` recomputes the convs too."""
  model, params, inputs = _setup("digits16", scan_blocks=True)
  assert model.block_types == ("res", "attn") and model.num_blocks == (1, 1)

  def grad_flops(**remat):
    m = models.get_model("digits16", scan_blocks=True, **remat)
    return flops.count_flops(jax.make_jaxpr(_grad(m))(params, inputs, jax.random.key(1)))

  plain = grad_flops()
  saving = grad_flops(remat=True, remat_policy="dense_and_conv_saveable")
  tokens = model.image_size // 2  # the attention level runs at 8 x 8
  level = 2 * 4 * tokens**4 * model.channels[1]  # one down and one up block
  mid = model.mid_blocks * 4 * (tokens // 2)**4 * model.mid_channels  # 4 x 4 tokens
  assert plain.exact and saving.exact
  assert saving.flops - plain.flops == BATCH * (level + mid)
  assert grad_flops(remat=True).flops - plain.flops > 2 * BATCH * (level + mid)
  # One policy per level, then the mid stack: each group recomputes its own attention only.
  policy = lambda *names: dict(remat=True, remat_policy=",".join(names))
  dense = "dense_and_conv_saveable"
  assert grad_flops(**policy(dense, dense, "none")).flops - plain.flops == BATCH * level
  assert grad_flops(**policy(dense, "none", dense)).flops - plain.flops == BATCH * mid
  assert grad_flops(**policy(dense, dense, dense)).flops == saving.flops


def test_every_pod_preset_remat_policy_is_valid_for_its_model():
  for preset, policy in config_base.REMAT_POLICY.items():
    # validate() raises on an unknown name or a count other than 1 or levels + 1.
    models.get_model(preset, remat=True, remat_policy=policy).validate()


@pytest.mark.parametrize("policy,error", [
    ("dense_and_conv_saveable,nothing_saveable", "one policy or 3 comma-separated"),
    ("dense_and_conv_saveable,sometimes,none", "'sometimes'")])
def test_per_level_remat_policy_errors(policy, error):
  with pytest.raises(ValueError, match=error):
    models.get_model("digits16", remat=True, remat_policy=policy).validate()


def test_labels_none_is_the_null_class_and_unconditional_ignores_labels():
  model, params, (z, logsnr, _) = _setup("digits8")
  null = jnp.full((BATCH,), model.num_classes, jnp.int32)
  apply = lambda m, p, y: m.apply({"params": p}, z, logsnr, y)  # pylint: disable=g-long-lambda
  np.testing.assert_array_equal(apply(model, params, None), apply(model, params, null))
  assert _rel_err(apply(model, params, jnp.zeros_like(null)), apply(model, params, null)) > 1e-3
  toy, toy_params, (x, t, _) = _setup("mlp_toy")
  np.testing.assert_array_equal(toy.apply({"params": toy_params}, x, t, None),
                                toy.apply({"params": toy_params}, x, t, jnp.zeros_like(null)))


# ---- sharding ----------------------------------------------------------------------------

def _mesh():
  """The trainer's 2x4 ('data', 'fsdp') mesh."""
  return sharding_lib.make_mesh(ml_collections.ConfigDict({"data": 2, "fsdp": 4}),
                                jax.devices()[:8])


def test_param_shardings_fsdp_on_a_2x4_mesh():
  mesh = _mesh()
  abstract = models.abstract_variables(models.get_model("imagenet64_small"))["params"]
  shardings = partitioning.param_shardings(abstract, mesh)
  shapes = partitioning.unbox(abstract)
  assert jax.tree.structure(shardings) == jax.tree.structure(shapes)
  sharded_bytes = total_bytes = 0
  for (path, sharding), shape in zip(jax.tree_util.tree_leaves_with_path(shardings),
                                     jax.tree.leaves(shapes)):
    spec = tuple(sharding.spec) + (None,) * (len(shape.shape) - len(sharding.spec))
    for size, axes in zip(shape.shape, spec):
      if axes is not None:
        assert axes == "fsdp" and size % mesh.shape["fsdp"] == 0, (path, spec)
    assert "data" not in spec  # parameters are only FSDP-sharded
    total_bytes += shape.size * 4
    sharded_bytes += shape.size * 4 * ("fsdp" in spec)
    if "'layers'" in jax.tree_util.keystr(path):
      assert spec[0] is None  # the scan axis is replicated
  assert sharded_bytes > 0.99 * total_bytes
  # A dimension the mesh axis does not divide is replicated rather than rejected.
  odd = partitioning.logical_to_spec(("fan_in", "embed"), (3, 6), mesh)
  assert tuple(odd) == (None, None)
  with pytest.raises(ValueError, match="no rule"):
    partitioning.logical_to_spec(("embedd",), (8,), mesh)


def test_sharded_forward_matches_single_device():
  mesh = _mesh()
  model, params, _ = _setup("small32")
  z_spec, _, _ = models.input_specs(model, 8)
  z = jax.random.normal(jax.random.key(3), z_spec.shape)
  logsnr = jnp.linspace(-8.0, 8.0, 8)
  labels = jnp.arange(8, dtype=jnp.int32)
  expected = jax.jit(lambda p: model.apply({"params": p}, z, logsnr, labels))(params)

  shardings = partitioning.param_shardings(models.abstract_variables(model)["params"], mesh)
  sharded_params = jax.device_put(params, shardings)
  batch = [jax.device_put(x, partitioning.batch_sharding(mesh, x.ndim))
           for x in (z, logsnr, labels)]
  forward = jax.jit(lambda p, *x: model.apply({"params": p}, *x))
  with jax.set_mesh(mesh), nn.logical_axis_rules(partitioning.LOGICAL_AXIS_RULES):
    # The blocks pin their activations' batch axis to ('data', 'fsdp').
    assert '{"data", "fsdp"}' in forward.lower(sharded_params, *batch).as_text()
    out = forward(sharded_params, *batch)
  assert out.sharding.spec[0] == ("data", "fsdp")
  np.testing.assert_allclose(out, expected, rtol=1e-4, atol=1e-4)


# ---- summary CLI -------------------------------------------------------------------------

def test_summary_cli_preset_and_config(capsys):
  result = summary.main(["--preset", "digits8"])
  text = capsys.readouterr().out
  assert "parameters: " in text and "mid" in text and "GFLOP" in text
  model, params, _ = _setup("digits8")
  assert result["params"] == sum(p.size for p in jax.tree.leaves(params))
  assert result["stage_shapes"] == {"down0": (1, 8, 8, 32), "mid": (1, 4, 4, 128),
                                    "up0": (1, 8, 8, 32)}
  # Only the conditioning MLP is shared across a batch, so per-example FLOPs barely change.
  assert abs(result["flops_per_example"] / result["flops_batch1"] - 1) < 0.05

  config_path = os.path.join(os.path.dirname(os.path.dirname(__file__)), "tiny_model_config.py")
  result = summary.main([f"--config={config_path}"])
  assert "bfloat16" in capsys.readouterr().out
  assert result["stage_shapes"]["up0"] == (1, 16, 16, 16)


def test_summary_flops_bound_the_matmul_count_and_allocate_nothing():
  # mlp_toy: the package's FLOP counter (runtime/flops.py) counts matmuls, not element-wise work, so
  # a forward is exactly the dense layers' 2 * fan_in * fan_out per example.
  model = models.get_model("mlp_toy")
  w, e, d = model.width, model.emb_dim, model.data_dim
  macs = (256 * e + e * e  # conditioning MLP
          + d * w + model.depth * (e * 2 * w + 2 * w * model.mlp_ratio * w) + w * d)
  flops = summary.forward_flops(model, batch=1)
  assert flops == 2 * macs

  before = sum(x.nbytes for x in jax.live_arrays())
  result = summary.summarize(models.get_model("imagenet64_small"), batch=2)
  after = sum(x.nbytes for x in jax.live_arrays())
  assert result["params"] > 3e8
  assert after - before < 1e6  # the parameters alone would be 1.6 GB
