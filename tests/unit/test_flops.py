"""The one FLOP counter (runtime/flops.py): matmuls and convolutions counted on the jaxpr,
against closed-form counts and XLA's own cost analysis, and the step's model FLOPs, which
the trainer's MFU and the compile report divide by."""
import jax
import jax.numpy as jnp
import pytest

from multistep_cm.config import base as config_base
from multistep_cm.runtime import flops
from multistep_cm.training import step as train_step


def _scanned_matmuls(x, w, length):
  y, _ = jax.lax.scan(lambda c, _: (jnp.tanh(c @ w), None), x, None, length=length)
  return y


def _unrolled_matmuls(x, w, length):
  for _ in range(length):
    x = jnp.tanh(x @ w)
  return x


def _xla_flops(fn, *args):
  cost = jax.jit(fn).lower(*args).compile().cost_analysis()
  return (cost[0] if isinstance(cost, (list, tuple)) else cost)["flops"]


def test_scan_bodies_count_length_times_where_xla_counts_them_once():
  """The reason the report counts FLOPs itself (runtime/flops.py)."""
  m, k, length = 8, 64, 5
  x, w = jnp.ones((m, k)), jnp.ones((k, k))
  matmul = 2 * m * k * k
  for fn in (_scanned_matmuls, _unrolled_matmuls):
    jaxpr = jax.make_jaxpr(fn, static_argnums=2)(x, w, length)
    assert flops.count_flops(jaxpr).flops == length * matmul
  # XLA: every matmul unrolled (plus one FLOP per tanh element), the scan's just once.
  unrolled = _xla_flops(lambda x, w: _unrolled_matmuls(x, w, length), x, w)
  scanned = _xla_flops(lambda x, w: _scanned_matmuls(x, w, length), x, w)
  assert length * matmul <= unrolled <= length * matmul * 1.05
  assert scanned < 2 * matmul


@pytest.mark.parametrize("size,padding", [(8, "SAME"), (9, "VALID"), (6, ((2, 0), (1, 3)))])
def test_convolution_flops_count_taps_on_the_image(size, padding):
  """2 x (batch x out ch x in ch) x the (output, tap) pairs that read the image, not padding."""
  x = jnp.ones((2, 3, size, size))  # NCHW
  w = jnp.ones((5, 3, 3, 3))  # OIHW
  fn = lambda x, w: jax.lax.conv_general_dilated(x, w, (1, 1), padding)
  taps = jax.lax.conv_general_dilated(jnp.ones((1, 1, size, size)), jnp.ones((1, 1, 3, 3)),
                                      (1, 1), padding).sum()  # sum over outputs of real taps
  got = flops.count_flops(jax.make_jaxpr(fn)(x, w)).flops
  assert got == 2 * 2 * 5 * 3 * float(taps)
  assert got == pytest.approx(_xla_flops(fn, x, w), rel=0.02)


def test_model_flops_do_not_depend_on_scanning_and_remat_adds_hardware_flops():
  def counts(**model):
    config = config_base.digits_config("ct", 2, 8, "")
    config.batch_size, config.mesh.data, config.mesh.fsdp = 16, 2, 4
    for key, value in model.items():
      config.model[key] = value
    return flops.count_flops(train_step.StepBuilder.from_config(config).trace().jaxpr)
  scanned = counts(scan_blocks=True, mid_blocks=3)
  assert scanned.exact and scanned.flops > 0
  assert counts(scan_blocks=False, mid_blocks=3).flops == scanned.flops
  assert counts(scan_blocks=True, mid_blocks=3, remat=True).flops > scanned.flops


def test_a_module_student_with_its_own_remat_counts_model_flops_without_it():
  """A module trained as its own student (teacher.student='teacher') whose remat is its own
  switch (the ADM UNet's): model FLOPs are the step with it off, hardware FLOPs with it on,
  and the model FLOPs equal those of the same module built without remat."""
  def builder(name):
    config = config_base.digits_config("cd", 2, 8, "/w.npz")
    config.batch_size, config.mesh.data, config.mesh.fsdp = 8, 1, 1
    config.teacher.update({"kind": "module", "module": f"outside_teachers:{name}",
                           "student": "teacher", "frame": "ve", "prediction": "x"})
    return train_step.StepBuilder.from_config(config, jax.devices()[:1])
  model, hardware = builder("tiny_adm_remat").flops()
  plain_model, plain_hardware = builder("tiny_adm").flops()
  assert model.exact and hardware.exact
  assert hardware.flops > model.flops
  assert model.flops == plain_model.flops == plain_hardware.flops


def test_step_flops_count_every_block_of_a_scanned_stack():
  """XLA counts a loop body once; the step's FLOPs (logged MFU) must not depend on scanning."""
  config = config_base.digits_config("diffusion")
  config.batch_size, config.model.mid_blocks = 8, 3
  config.mesh.data = config.mesh.fsdp = 1
  one_device = jax.devices()[:1]  # the count does not depend on the mesh
  scanned, _ = train_step.StepBuilder.from_config(config, one_device).flops()
  config.model.scan_blocks = False
  unrolled, _ = train_step.StepBuilder.from_config(config, one_device).flops()
  assert scanned.exact and unrolled.exact
  assert scanned.flops == pytest.approx(unrolled.flops, rel=0.02)
