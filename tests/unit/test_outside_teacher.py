"""A teacher of your own in the trainer (config.teacher, teachers/module.py, teachers/weights.py).

The teachers are our digits UViT written in other codebases' conventions
(tests/outside_teachers.py: SD3's and SiT's flow velocity, EDM's VE x-prediction, DiT's eps
on DDPM's betas), so the truth is known: through `OutsideNetwork` each must be the UViT
itself, and a CD, Direct or PD loss with it as the teacher (or as the student) must be the
loss with our own network, to float32 rounding. The weights files are read against the
`safetensors` package's and orbax's own writers, and every wrong combination is refused in
one line before anything compiles.
"""
import copy
import os

from flax import traverse_util
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import orbax.checkpoint as ocp
import pytest
import safetensors.numpy

from multistep_cm.config import checks as config_checks
from multistep_cm.config import plan as plan_lib
from multistep_cm.diffusion import losses
from multistep_cm.diffusion import schedules
from multistep_cm.models import denoiser
from multistep_cm.models import partitioning
from multistep_cm.teachers import module as teacher_module
from multistep_cm.teachers import weights as teacher_weights
from multistep_cm.training import step as train_step
import helpers
import outside_teachers

SPEC = os.path.join(helpers.TESTS, "outside_teachers.py")


def outside(config, name, **teacher):
  """`config` with the teacher `name` of tests/outside_teachers.py (kind 'module')."""
  config = copy.deepcopy(config)
  config.teacher.update({"kind": "module", "module": f"{SPEC}:{name}",
                         **outside_teachers.CONVENTIONS[name], **teacher})
  return config


def params_of(model, seed):
  return partitioning.unbox(train_step.init_params(model, jax.random.PRNGKey(seed)))


@pytest.fixture(scope="module")
def inner_params():
  return params_of(outside_teachers.inner_network(), 1)


def digits_batch(n=16, seed=0):
  rng = np.random.default_rng(seed)
  return {"image": jnp.asarray(rng.uniform(-1, 1, (n, 8, 8, 1)), jnp.float32),
          "label": jnp.asarray(rng.integers(0, 10, n), jnp.int32)}


# --- the network --------------------------------------------------------------------------------


@pytest.mark.parametrize("name", sorted(outside_teachers.CONVENTIONS))
def test_outside_network_is_the_network_it_wraps(name, inner_params):
  config = outside(helpers.tiny_digits("cd", teacher="unused"), name)
  plan = plan_lib.RunPlan.from_config(config)
  net = plan.teacher_model
  assert isinstance(net, teacher_module.OutsideNetwork)
  inner = outside_teachers.inner_network()
  z = jax.random.normal(jax.random.PRNGKey(2), (8, 8, 8, 1))
  # DiT's schedule spans logSNR [-10.1, 9.2]; the others are unclipped inside [-30, 30].
  logsnr = jnp.linspace(-10.0, 9.0, 8) if name == "dit" else jnp.linspace(-14.0, 14.0, 8)
  labels = jnp.arange(8) % 10
  want = inner.apply({"params": inner_params}, z, logsnr, labels)
  got = net.apply({"params": {"net": {"inner": inner_params}}}, z, logsnr, labels)
  alpha = jnp.sqrt(jax.nn.sigmoid(logsnr))[:, None, None, None]
  sigma = jnp.sqrt(jax.nn.sigmoid(-logsnr))[:, None, None, None]
  # x̂ = alpha z - sigma v: what the samplers and losses read (§1.3).
  np.testing.assert_allclose(alpha * z - sigma * got, alpha * z - sigma * want, atol=2e-4)


# --- the losses -------------------------------------------------------------------------------


def _loss(plan, student_params, teacher_params, batch, step=7):
  loss_fn = train_step.make_loss_fn(plan, plan.model, plan.schedule, plan.teacher_model)
  loss, metrics = jax.jit(loss_fn)(student_params, teacher_params, batch, jnp.int32(step),
                                   jax.random.PRNGKey(3))
  return float(loss), metrics


@pytest.mark.parametrize("mode,name,guidance", [
    ("cd", "flow_sd3", 1.5), ("cd", "edm", 0.0), ("cd", "flow_sit", 0.0),
    ("direct", "flow_sd3", 0.0), ("pd", "edm", 0.0)])
def test_a_loss_with_an_outside_teacher_is_the_loss_with_ours(mode, name, guidance,
                                                            inner_params):
  """Algorithm 1 (with aDDIM teacher steps and guidance), Direct and PD targets: the same
  teacher written in another frame gives the same loss."""
  ours = helpers.tiny_digits(mode, teacher="unused")
  ours.loss.guidance_scale = guidance
  plan_ours = plan_lib.RunPlan.from_config(ours)
  plan_theirs = plan_lib.RunPlan.from_config(outside(ours, name))
  student = params_of(plan_ours.model, 4)
  batch = digits_batch()
  want, _ = _loss(plan_ours, student, inner_params, batch)
  got, _ = _loss(plan_theirs, student, {"net": {"inner": inner_params}}, batch)
  assert np.isfinite(want) and want > 0
  np.testing.assert_allclose(got, want, rtol=2e-4)


def test_a_student_of_the_teachers_architecture_is_that_network(inner_params):
  """teacher.student='teacher': the student is the teacher's module; its loss is the loss of
  our UViT with the same weights (so, initialised from the teacher, it starts as the teacher)."""
  ours = helpers.tiny_digits("cd", teacher="unused")
  theirs = outside(ours, "flow_sd3", student="teacher")
  plan_theirs = plan_lib.RunPlan.from_config(theirs)
  assert isinstance(plan_theirs.model, teacher_module.OutsideNetwork)
  assert plan_theirs.checkpoint_meta(0)["model"] == f"teacher:{SPEC}:flow_sd3"
  student = params_of(plan_theirs.model, 5)
  assert set(student) == {"net"}
  batch = digits_batch(seed=1)
  want, _ = _loss(plan_lib.RunPlan.from_config(ours), student["net"]["inner"], inner_params,
                  batch)
  got, _ = _loss(plan_theirs, student, {"net": {"inner": inner_params}}, batch)
  np.testing.assert_allclose(got, want, rtol=2e-4)


# --- weights files --------------------------------------------------------------------------


def _flat(tree):
  return {k: np.asarray(v) for k, v in traverse_util.flatten_dict(tree, sep="/").items()}


def test_weights_read_what_safetensors_npz_and_orbax_write(tmp_path, inner_params):
  want = _flat({"inner": inner_params})
  safetensors.numpy.save_file(want, str(tmp_path / "w.safetensors"))
  np.savez(tmp_path / "w.npz", **want)
  ocp.PyTreeCheckpointer().save(str(tmp_path / "orbax"),
                                jax.tree.map(np.asarray, {"inner": inner_params}))
  dotted = {k.replace("/", "."): v for k, v in want.items()}
  safetensors.numpy.save_file(dotted, str(tmp_path / "dotted.safetensors"))
  for name in ("w.safetensors", "w.npz", "orbax", "dotted.safetensors"):
    got = _flat(teacher_weights.read(str(tmp_path / name)))
    assert sorted(got) == sorted(want), name
    for key in want:
      np.testing.assert_array_equal(got[key], want[key], err_msg=f"{name}: {key}")
  # Our writer is read back by the real library, bfloat16 included.
  mixed = {"a/b": np.arange(6, dtype=np.float32).reshape(2, 3),
           "c": np.ones(3, jnp.bfloat16)}
  teacher_weights.write_safetensors(str(tmp_path / "ours.safetensors"), mixed)
  back = safetensors.numpy.load_file(str(tmp_path / "ours.safetensors"))
  for key, value in mixed.items():
    np.testing.assert_array_equal(np.asarray(back[key], np.float32), value.astype(np.float32))


def test_weights_that_do_not_fit_name_the_first_mismatch(tmp_path):
  abstract = {"Dense_0": {"kernel": jax.ShapeDtypeStruct((3, 4), jnp.float32),
                          "bias": jax.ShapeDtypeStruct((4,), jnp.float32)}}
  cases = [
      ({"Dense_0/kernel": np.zeros((3, 4))}, "Dense_0/bias is missing"),
      ({"Dense_0/kernel": np.zeros((3, 5)), "Dense_0/bias": np.zeros(4)},
       "Dense_0/kernel has shape (3, 5), the module (3, 4)"),
      ({"Dense_0/kernel": np.zeros((3, 4)), "Dense_0/bias": np.zeros(4), "extra": np.zeros(1)},
       "extra is not a parameter of the module"),
  ]
  for flat, fragment in cases:
    path = str(tmp_path / "w.npz")
    np.savez(path, **flat)
    with pytest.raises(teacher_weights.WeightsError, match=".*") as info:
      teacher_weights.check_fits(path, teacher_weights.read(path), abstract)
    assert fragment in str(info.value) and "\n" not in str(info.value), str(info.value)
  for content, fragment in ((b"\x05", "shorter than its header"),
                            ((10**6).to_bytes(8, "little") + b"{}", "past the end"),
                            ((2).to_bytes(8, "little") + b"no", "not JSON")):
    (tmp_path / "bad.safetensors").write_bytes(content)
    with pytest.raises(teacher_weights.WeightsError, match=fragment):
      teacher_weights.read(str(tmp_path / "bad.safetensors"))
  with pytest.raises(teacher_weights.WeightsError, match="does not exist"):
    teacher_weights.read(str(tmp_path / "none.npz"))
  (tmp_path / "w.pt").write_bytes(b"")
  with pytest.raises(teacher_weights.WeightsError, match="must be a .npz or .safetensors"):
    teacher_weights.read(str(tmp_path / "w.pt"))


# --- refusals ----------------------------------------------------------------------------------


def _refused(config, *fragments):
  with pytest.raises(config_checks.ConfigError) as info:
    config_checks.validate(config, num_devices=8, num_processes=1)
  message = str(info.value)
  assert "\n" not in message, message
  for fragment in fragments:
    assert fragment in message, (fragment, message)


def test_wrong_teachers_are_refused_in_one_line(tmp_path):
  cd = helpers.tiny_digits("cd", teacher="weights.npz")
  config_checks.validate(outside(cd, "flow_sd3"), num_devices=8, num_processes=1)  # accepted
  _refused(outside(cd, "flow_sd3", frame="flux"), "config.teacher.frame must be one of")
  _refused(outside(cd, "edm", prediction="velocity"),
           "prediction 'velocity' is not a target of a 've' teacher")
  _refused(outside(cd, "flow_sd3", flow_time=""), "config.teacher.flow_time must be "
           "'data_at_0'")
  _refused(outside(cd, "edm", flow_time="data_at_0"), "flow_time applies to "
           "teacher.frame='flow' only")
  _refused(outside(cd, "dit", schedule=""), "schedule is needed")
  _refused(outside(cd, "edm", schedule="ddpm_linear"), "schedule applies to 'vp' teachers")
  _refused(outside(cd, "flow_sd3", module=f"{SPEC}:nothing"), "has no 'nothing'")
  _refused(outside(cd, "flow_sd3", module=f"{SPEC}:CONVENTIONS"),
           "is a dict, not a flax.linen.Module")
  _refused(outside(cd, "flow_sd3", module="no_such_package.teachers:net"),
           "importing 'no_such_package.teachers' failed: ModuleNotFoundError")
  _refused(outside(cd, "flow_sd3", module="just_a_name"), "must be 'package.module:name'")
  broken = tmp_path / "broken.py"
  broken.write_text("raise RuntimeError('the user code is broken\\nsecond line')\n")
  _refused(outside(cd, "flow_sd3", module=f"{broken}:net"),
           "RuntimeError: the user code is broken")
  ct = helpers.tiny_digits("ct")
  _refused(outside(ct, "flow_sd3"), "needs loss.mode 'cd', 'direct' or 'pd'")
  diffusion = helpers.tiny_digits()
  _refused(outside(diffusion, "flow_sd3"), "with loss.mode='diffusion' trains the module "
           "itself and needs teacher.student='teacher'")
  for weights in ("", "weights.npz"):  # the module trained afresh, or from its weights
    trained = outside(diffusion, "flow_sd3", student="teacher")
    trained.teacher_checkpoint = weights
    config_checks.validate(trained, num_devices=8, num_processes=1)
  run_teacher = copy.deepcopy(cd)
  run_teacher.teacher.frame = "ve"
  _refused(run_teacher, "config.teacher.frame describes a teacher of your own")
  anystep = helpers.tiny_digits("cd", teacher="weights.npz")
  anystep.loss.anystep_counts = (1, 2)
  anystep.loss.student_steps = 2
  anystep.model.segment_cond = "steps"
  anystep.model.num_step_values = 2
  _refused(outside(anystep, "flow_sd3", student="teacher"),
           "has no input for config.loss.anystep_counts")
  initialised = outside(cd, "flow_sd3", student="teacher")
  initialised.init_from = "/somewhere"
  _refused(initialised, "config.init_from must be empty with teacher.student='teacher'")
  no_weights = outside(cd, "flow_sd3")
  no_weights.teacher_checkpoint = ""
  _refused(no_weights, "config.teacher_checkpoint must name the weights of "
           "config.teacher.module")


def test_a_resume_cannot_change_the_module_a_student_is():
  old = outside(helpers.tiny_digits("cd", teacher="w.npz"), "flow_sd3", student="teacher")
  new = outside(old, "flow_sit", student="teacher")
  changes = config_checks.config_changes(old, new)
  with pytest.raises(config_checks.ConfigError, match="config.teacher.flow_time"):
    config_checks.check_resume(changes, "/w", student_is_teacher=True)
  config_checks.check_resume(changes, "/w", student_is_teacher=False)  # only its teacher
  with pytest.raises(config_checks.ConfigError, match="config.teacher.student"):
    config_checks.check_resume(config_checks.config_changes(
        old, outside(old, "flow_sd3", student="model")), "/w")


def test_schedule_keys_of_the_teacher_are_checked():
  cd = helpers.tiny_digits("cd", teacher="weights.npz")
  config = outside(cd, "dit")
  config.teacher.schedule_kwargs = ml_collections.ConfigDict({"beta_end": 2.0})
  _refused(config, "config.teacher.schedule_kwargs")
  config = outside(cd, "edm")
  config.teacher.schedule_kwargs = ml_collections.ConfigDict({"beta_end": 0.02})
  _refused(config, "config.teacher.schedule_kwargs needs teacher.schedule")


# --- a flow-matching network of ours (loss.prediction='velocity', §17.5) -----------------------


def test_the_velocity_loss_is_flow_matchings_loss():
  """`diffusion_loss(prediction='velocity')` is ||u - û||^2 / d with u = eps - x and û the
  denoiser's velocity in flow coordinates, û = (z_fm - x̂) / t_fm (written out here)."""
  schedule = schedules.flow_matching(shift=3.0)
  rng = np.random.default_rng(0)
  x = jnp.asarray(rng.normal(size=(64, 5)), jnp.float32)
  eps = jnp.asarray(rng.normal(size=(64, 5)), jnp.float32)
  t = jnp.asarray(rng.uniform(0.02, 0.98, 64), jnp.float32)
  denoise = lambda z, t: 0.3 * z + 0.1 * jnp.tanh(z)  # any x̂
  got = losses.diffusion_loss(denoise, x, eps, t, schedule, prediction="velocity")
  logsnr = np.asarray(schedule.logsnr(t), np.float64)[:, None]
  t_fm = 1.0 / (1.0 + np.exp(logsnr / 2.0))  # sigma / (alpha + sigma)
  alpha, sigma = np.sqrt(1 / (1 + np.exp(-logsnr))), np.sqrt(1 / (1 + np.exp(logsnr)))
  z = alpha * np.asarray(x, np.float64) + sigma * np.asarray(eps, np.float64)
  x_hat = np.asarray(denoise(jnp.asarray(z, jnp.float32), t), np.float64)
  u_hat = ((1 - t_fm) * x + t_fm * eps - x_hat) / t_fm
  want = np.mean(np.square(np.asarray(eps - x, np.float64) - u_hat), axis=1)
  np.testing.assert_allclose(got, want, rtol=1e-4)
  np.testing.assert_allclose(losses.diffusion_loss(denoise, x, eps, t, schedule),
                             want / np.square(alpha + sigma)[:, 0], rtol=1e-4)


def test_a_velocity_run_calls_our_network_at_flow_coordinates():
  """With loss.prediction='velocity' our UViT is read as u(z_fm, 40 t_fm): x̂ = z_fm - t_fm û."""
  config = helpers.tiny_digits()
  config.loss.prediction = "velocity"
  config.schedule = ml_collections.ConfigDict({"name": "flow_matching",
                                               "kwargs": {"shift": 2.0}})
  config_checks.validate(config, num_devices=8, num_processes=1)
  plan = plan_lib.RunPlan.from_config(config)
  assert plan.teacher_model is plan.model
  params = params_of(plan.model, 6)
  inner = outside_teachers.inner_network()
  z = jax.random.normal(jax.random.PRNGKey(7), (6, 8, 8, 1))
  t = jnp.linspace(0.05, 0.95, 6)
  labels = jnp.arange(6)
  x_hat = denoiser.apply_x(plan.model, params, z, t, plan.schedule, labels)
  logsnr = plan.schedule.logsnr(t)
  alpha, sigma = jnp.sqrt(jax.nn.sigmoid(logsnr)), jnp.sqrt(jax.nn.sigmoid(-logsnr))
  t_fm = (sigma / (alpha + sigma))[:, None, None, None]
  z_fm = z / (alpha + sigma)[:, None, None, None]
  u = inner.apply({"params": params["net"]}, z_fm, 40.0 * t_fm[:, 0, 0, 0], labels)
  np.testing.assert_allclose(x_hat, z_fm - t_fm * u, atol=2e-5)
  for key, value, fragment in (("loss.anystep_counts", (1, 2), "loss.anystep_counts"),
                               ("model.guidance_cond", True, "model.guidance_cond"),
                               ("loss.diffusion_weighting", "snr",
                                "loss.diffusion_weighting='snr'")):
    bad = copy.deepcopy(config)
    helpers.set_keys(bad, {key: value})
    _refused(bad, "config.loss.prediction='velocity'", fragment)


def test_a_module_with_a_train_argument_trains_with_its_dropout():
  """EDM's ADM UNet (dropout 0.5 here) as our network: `train=True` with a dropout rng
  reaches its dropout (two rngs, two outputs; one rng, the same output twice: the
  synchronised mask of a CD loss's two calls), and without it the call is deterministic and
  is the module's own eval-mode call through the adapter. A module without `train` (the DiT)
  is called as it is."""
  from multistep_cm.models import adm  # pylint: disable=g-import-not-at-top
  from multistep_cm.models import dit  # pylint: disable=g-import-not-at-top
  from multistep_cm.teachers import adapter  # pylint: disable=g-import-not-at-top
  net = adm.EDMTeacher(adm.ADMUNet(img_resolution=8, in_channels=1, out_channels=1,
                                   label_dim=10, model_channels=16, channel_mult=(1, 2),
                                   num_blocks=1, attn_resolutions=(4,), dropout=0.5))
  assert teacher_module.takes_train(net)
  assert not teacher_module.takes_train(dit.dit_digits_8px())
  model = teacher_module.OutsideNetwork(net=net, frame="ve", prediction="x", image_size=8,
                                        num_channels=1, num_classes=10)
  params = params_of(model, 0)
  batch = digits_batch(4)
  z, labels = batch["image"], batch["label"]
  t = jnp.full((4,), 0.5)
  schedule = schedules.get_schedule("edm")
  call = lambda rng: denoiser.apply_x(model, params, z, t, schedule, labels, rng)
  k1, k2 = jax.random.PRNGKey(1), jax.random.PRNGKey(2)
  np.testing.assert_array_equal(call(k1), call(k1))
  assert float(jnp.max(jnp.abs(call(k1) - call(k2)))) > 1e-3
  deterministic = call(None)
  assert float(jnp.max(jnp.abs(call(k1) - deterministic))) > 1e-3
  own = adapter.adapt(lambda x, s, y: net.apply({"params": params["net"]}, x, s, y),
                      frame="ve", prediction="x")
  np.testing.assert_allclose(deterministic, own(z, schedule.logsnr(t), labels), atol=1e-5)
