"""Guidance as an input: a student told the teacher's guidance scale w.

A range `loss.guidance_range` makes each example draw its own w; the teacher's CD step is
classifier-free guided at that w (x_var from the conditional output, §5.5) and the
student is told it through a zero-initialised input, so it starts as the teacher. It
then samples at any w of its range with one forward per step.
"""
import dataclasses
import os

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from multistep_cm.config import base as config_base
from multistep_cm.config import build as config_build
from multistep_cm.config import checks as config_checks
from multistep_cm.config import plan as plan_lib
from multistep_cm.diffusion import losses
from multistep_cm.diffusion import schedules
from multistep_cm.evaluation import report
from multistep_cm.evaluation import sample_metrics
from multistep_cm import models
from multistep_cm.models import denoiser
from multistep_cm.models import partitioning
from multistep_cm.runtime import checkpointing
from multistep_cm.sampling import generation
from multistep_cm.sampling import runs
from multistep_cm.training import loop as train
from multistep_cm.training import step as train_step

from helpers import run_module
from helpers import set_keys
from helpers import tiny_digits

NUM_CLASSES = 3
W_RANGE = (0.5, 3.0)
_NEW = ("guidance_dense", "segment_dense")  # the zero-initialised inputs of a student


def _student(**kw):
  return models.get_model("mlp_toy", width=32, depth=2, num_classes=NUM_CLASSES,
                          guidance_cond=True, **kw)


def _random_params(model, seed, zero=_NEW):
  """Initial parameters plus noise on every array (the output layer starts at zero), the
  inputs in `zero` left as initialised."""
  params = partitioning.unbox(jax.jit(lambda k: model.init(
      {"params": k}, *models.dummy_inputs(model, 2), **models.init_kwargs(model, 2)))(
          jax.random.PRNGKey(seed))["params"])
  rng = np.random.default_rng(seed)
  noisy = jax.tree.map(lambda p: jnp.asarray(p + 0.3 * rng.standard_normal(p.shape), p.dtype),
                       params)
  noisy["cond"].update({k: params["cond"][k] for k in zero if k in params["cond"]})
  return noisy


def _without_new(params):
  return {**params, "cond": {k: v for k, v in params["cond"].items() if k not in _NEW}}


def test_guidance_conditioned_student_starts_as_the_teacher():
  """Zero-initialised: with the teacher's parameters the student's output is the
  teacher-architecture model's for every w (and every segment start: any-step too). The
  UViT shares `layers.Conditioning`; its wiring is exercised by the sample command below."""
  student = _student(segment_cond="segment_start", num_step_values=2)
  z = jax.random.normal(jax.random.PRNGKey(2), (4, 8))
  teacher = config_build.teacher_architecture(student)
  assert not teacher.guidance_cond and teacher.segment_cond == "none"
  params = _random_params(student, 0)
  for leaf in jax.tree.leaves(params["cond"]["guidance_dense"]):
    np.testing.assert_array_equal(leaf, 0.0)
  # The student's parameters are the teacher's plus the new inputs: a diffusion
  # checkpoint initialises it (train_step.merge_params).
  teacher_shapes = partitioning.unbox(models.abstract_variables(teacher)["params"])
  assert (jax.tree.structure(teacher_shapes)
          == jax.tree.structure(_without_new(params)))
  logsnr, labels = jnp.linspace(-5, 5, 4), jnp.array([0, 1, 2, NUM_CLASSES])
  want = jax.jit(teacher.apply)({"params": _without_new(params)}, z, logsnr, labels)
  kw = {"segment": jnp.array([3.0, -1.0, 0.5, 8.0])}
  at = jax.jit(lambda p, w: student.apply({"params": p}, z, logsnr, labels, guidance=w, **kw))
  for w in (0.0, 0.5, 1.7, 3.0, 7.0):
    np.testing.assert_allclose(at(params, jnp.full((4,), w)), want, rtol=1e-6, atol=1e-6)
  # Once the new input moves, w matters; a student told nothing is refused.
  params["cond"]["guidance_dense"] = _random_params(student, 5, zero=())["cond"][
      "guidance_dense"]
  assert not np.allclose(at(params, jnp.full((4,), 0.5)), at(params, jnp.full((4,), 3.0)),
                         atol=1e-4)
  with pytest.raises(ValueError, match="needs `guidance`"):
    jax.eval_shape(lambda p: student.apply({"params": p}, z, logsnr, labels, **kw), params)


def test_cfg_takes_one_scale_per_example():
  """x̂_g = x̂_c + w_i (x̂_c - x̂_u) row by row; the conditional output does not depend on w."""
  teacher = config_build.teacher_architecture(_student())
  params = _random_params(teacher, 1)
  schedule = schedules.cosine()
  z, t = jax.random.normal(jax.random.PRNGKey(3), (4, 8)), jnp.array([0.2, 0.4, 0.6, 0.9])
  labels, w = jnp.array([0, 1, 2, 1]), jnp.array([0.0, 0.5, 2.0, 3.0])

  @jax.jit
  def all_rows(w):
    x_g, x_c = denoiser.make_denoise_fn(teacher, params, schedule, labels, guidance_scale=w,
                                        return_conditional=True)(z, t)
    cond = denoiser.apply_x(teacher, params, z, t, schedule, labels)
    uncond = denoiser.apply_x(teacher, params, z, t, schedule, jnp.full((4,), NUM_CLASSES))
    return x_g, x_c, cond, uncond

  @jax.jit
  def one_row(i, w_i):  # the scalar-w teacher on row i
    take = lambda a: jax.lax.dynamic_slice_in_dim(a, i, 1)
    return denoiser.make_denoise_fn(teacher, params, schedule, take(labels),
                                    guidance_scale=w_i, return_conditional=True)(take(z),
                                                                                 take(t))

  x_g, x_c, cond, uncond = all_rows(w)
  np.testing.assert_allclose(x_c, cond, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(x_g, cond + w[:, None] * (cond - uncond), rtol=1e-5, atol=1e-5)
  assert not np.allclose(cond, uncond, atol=1e-3)
  for i in range(4):
    g, c = one_row(i, w[i])
    np.testing.assert_allclose(g, x_g[i:i + 1], rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(c, x_c[i:i + 1], rtol=1e-5, atol=1e-5)


def _range_config(**kw):
  c = config_base.mixture_config("cd", student_steps=2)
  c.data.num_classes = NUM_CLASSES
  c.model.update(width=32, depth=2, guidance_cond=True)
  c.loss.guidance_range = W_RANGE
  c.loss.teacher_steps_start = c.loss.teacher_steps_end = 8
  c.loss.anneal_steps = 0
  for key, value in kw.items():
    c.loss[key] = value
  return c


def test_cd_loss_guides_each_example_at_its_own_w(monkeypatch):
  """The trainer's loss with a range: every example's loss equals the loss recomputed for
  that example alone with a teacher guided at its scalar w and the student told it."""
  config = _range_config()
  model, schedule = config_build.get_model(config), config_build.get_schedule(config)
  teacher_model = config_build.teacher_architecture(model)
  params = _random_params(model, 0, zero=())  # w matters to the student too
  teacher_params = _random_params(teacher_model, 1)
  batch = 16
  x = 0.7 * jax.random.normal(jax.random.PRNGKey(4), (batch, 8))
  labels = jnp.arange(batch, dtype=jnp.int32) % NUM_CLASSES
  seen = {"told": []}
  real_loss, real_apply = losses.mcm_loss, denoiser.apply_x

  def recording_loss(student_fn, x, eps, segment, n_rel, rng, **kw):
    out = real_loss(student_fn, x, eps, segment, n_rel, rng, **kw)
    seen.update(eps=eps, segment=segment, n_rel=n_rel, rng=rng, kw=kw, per_example=out[0])
    return out

  def recording_apply(m, *a, **kw):
    if m is model:
      seen["told"].append(kw.get("guidance"))
    return real_apply(m, *a, **kw)

  monkeypatch.setattr(losses, "mcm_loss", recording_loss)
  monkeypatch.setattr(denoiser, "apply_x", recording_apply)
  loss_fn = train_step.make_loss_fn(plan_lib.RunPlan.from_config(config), model, schedule,
                                    teacher_model=teacher_model)
  # Jitted as the trainer runs it; the recorded values leave the trace as outputs.
  kw = {}

  def traced(*a):
    loss = loss_fn(*a)[0]
    kw.update(seen.pop("kw"))  # static: the loss settings; the grid is traced
    seen["grid"] = kw.pop("grid")
    return loss, seen

  loss, seen = jax.jit(traced)(params, teacher_params, {"x": x, "label": labels},
                               jnp.int32(0), jax.random.PRNGKey(7))
  monkeypatch.setattr(denoiser, "apply_x", real_apply)
  w = np.asarray(seen["told"][0])
  # One w per example, drawn from the range, the same for both student calls.
  assert w.shape == (batch,) and len(set(w.tolist())) == batch
  assert np.all((w >= W_RANGE[0]) & (w <= W_RANGE[1]))
  for told in seen["told"]:
    np.testing.assert_array_equal(np.asarray(told), w)
  np.testing.assert_allclose(loss, np.mean(seen["per_example"]), rtol=1e-6)

  @jax.jit
  def alone(i, w_teacher):
    """Example i's loss alone: the teacher guided at the scalar `w_teacher`, the student
    told the example's w."""
    take = lambda a: jax.lax.dynamic_slice_in_dim(a, i, 1)
    teacher_fn = denoiser.make_denoise_fn(teacher_model, teacher_params, schedule,
                                          take(labels), guidance_scale=w_teacher,
                                          return_conditional=True)
    student = lambda z, t, r: denoiser.apply_x(model, params, z, t, schedule, take(labels), r,
                                               guidance=take(jnp.asarray(w)))
    return real_loss(student, take(x), take(seen["eps"]), take(seen["segment"]),
                     take(seen["n_rel"]), seen["rng"], **{**kw, "teacher_fn": teacher_fn, "grid": seen["grid"]})[0][0]

  for i in (0, 5, 11):
    np.testing.assert_allclose(alone(i, w[i]), seen["per_example"][i], rtol=2e-5)
    # ... and not the loss at another w (the test can tell them apart).
    other = float(alone(i, w[i] + 1.0))
    assert abs(other - float(seen["per_example"][i])) > 1e-3 * abs(other)


class _Counting:
  """Records every network call of a sampler as it runs (the steps are a traced loop):
  batch size, w told, segment start."""

  def __init__(self, monkeypatch):
    self.calls = []
    real = denoiser.apply_x

    def apply_x(model, params, z, t, schedule, labels=None, dropout_rng=None, segment=None,
                guidance=None):
      record = lambda w, seg: self.calls.append((z.shape[0], w, seg))
      jax.debug.callback(record, guidance, segment, ordered=True)
      return real(model, params, z, t, schedule, labels, dropout_rng, segment, guidance)

    monkeypatch.setattr(denoiser, "apply_x", apply_x)


@pytest.mark.parametrize("anystep", [False, True])
def test_told_student_samples_with_one_forward_per_step(monkeypatch, anystep):
  """`--guidance=w` on a guidance-conditioned student: w passed, no guided pair; with
  any-step training both inputs compose (the segment start and w on every call)."""
  kw = dict(segment_cond="segment_start", num_step_values=2) if anystep else {}
  model, schedule = _student(**kw), schedules.cosine()
  params = _random_params(model, 0, zero=())
  spec = generation.SamplerSpec("mcm", 4, guidance=2.5, guidance_input=True)
  assert spec.nfe == 4 and "told guidance w = 2.5" in spec.describe()
  counting = _Counting(monkeypatch)
  z, labels = jax.random.normal(jax.random.PRNGKey(1), (6, 8)), jnp.arange(6) % NUM_CLASSES
  out = generation.make_sample_fn(model, schedule, spec)(params, z, labels)
  assert np.all(np.isfinite(out)) and len(counting.calls) == 4
  for k, (size, w, segment) in enumerate(counting.calls):
    assert size == 6  # one forward of the batch, not the conditional/unconditional pair
    np.testing.assert_array_equal(w, np.full(6, 2.5, np.float32))
    if anystep:  # the k-th step (from t = 1) lands on the segment starting at (3 - k) / 4
      np.testing.assert_allclose(segment, schedule.logsnr(jnp.full(6, (3 - k) / 4)),
                                 rtol=1e-6)
    else:
      assert segment is None
  # Another w gives other samples (the student is told it).
  other = generation.make_sample_fn(model, schedule, dataclasses.replace(spec, guidance=0.5))(
      params, z, labels)
  assert not np.allclose(out, other, atol=1e-5)


def test_config_checks_for_a_guidance_range():
  def digits(**kw):
    c = config_base.digits_config("cd", student_steps=2, teacher="/some/teacher")
    c.model.guidance_cond = True
    c.loss.guidance_range = (0.0, 3.0)
    return set_keys(c, kw)

  config_checks.validate(digits(), 8, 1)  # allowed
  config_checks.validate(config_base.set_anystep(digits(), (1, 2)), 8, 1)  # composes
  refused = {
      "model.guidance_cond": {"model.guidance_cond": False},
      "needs loss.guidance_range": {"loss.guidance_range": ()},
      "'cd' or 'direct'": {"loss.mode": "ct", "teacher_checkpoint": ""},
      "class- or text-conditional": {"data.num_classes": 0},
      "guidance_scale must be 0": {"loss.guidance_scale": 2.0},
      "w_min < w_max": {"loss.guidance_range": (3.0, 1.0)},
  }
  for message, overrides in refused.items():
    with pytest.raises(config_checks.ConfigError, match=message):
      config_checks.validate(digits(**overrides), 8, 1)
  for bad in ((1.0,), (0.0, 1.0, 2.0), (-1.0, 2.0), ("a", 2.0)):
    with pytest.raises(config_checks.ConfigError, match="guidance_range must be"):
      config_checks.check_keys(digits(**{"loss.guidance_range": bad}))


class _MeanPixel:
  """A stand-in metric: the report's rows, not the digits classifier, are under test."""
  description, primary = "mean pixel", "mean"

  def __call__(self, samples, labels):
    return {"mean": float(np.mean(samples))}


def test_sample_command_on_a_guidance_and_anystep_checkpoint(tmp_path, monkeypatch):
  """One checkpoint for every (S, w): it records its range (the trainer's metadata),
  sampling inside it works (`--steps=1 --guidance=2`), w defaults to the range's lower
  end, and a w outside is refused in one line with exit status 2. The run directory is
  written as the trainer writes it (config.json, a checkpoint with `_checkpoint_meta`) from
  initial parameters: training it would cost minutes here and change nothing checked."""
  config = config_base.set_anystep(tiny_digits("cd", teacher="/unused"), (1, 2))
  config.model.update(channels=(16,), mid_channels=32, mid_blocks=1, emb_dim=32, head_dim=16,
                      num_groups=4, guidance_cond=True)
  config.loss.guidance_range = (1.0, 3.0)
  config_checks.validate(config)
  student = str(tmp_path / "student")
  model = config_build.get_model(config)
  key = jax.random.PRNGKey(0)
  params = partitioning.unbox(jax.jit(lambda k: train_step.init_params(model, k))(key))
  state = train_step.create_state(params, optax.sgd(0.0), key, len(config.ema_decays))
  os.makedirs(student)
  train._write_config(config, student)  # pylint: disable=protected-access
  ckpt = checkpointing.Checkpointer(checkpointing.checkpoint_dir(student), async_save=False)
  plan = plan_lib.RunPlan.from_config(config)
  ckpt.save(1, state, plan.checkpoint_meta(1))
  ckpt.close()
  run = runs.load_run(student)
  assert run.meta["guidance_range"] == [1.0, 3.0] and run.guidance_range == (1.0, 3.0)
  spec = run.sampler_spec(1)
  assert spec.guidance == 1.0 and spec.guidance_input and spec.nfe == 1
  # The plan read back from config.json and the checkpoint is the trainer's own.
  assert run.plan == plan
  assert run.sampler_spec(2, guidance=3.0).guidance == 3.0
  with pytest.raises(ValueError, match=r"outside \[1, 3\]"):
    run.sampler_spec(1, guidance=0.5)
  # evaluate --guidance: a row per w told.
  monkeypatch.setattr(sample_metrics, "make_metric", lambda *a, **k: _MeanPixel())
  rows, _ = report.evaluate_runs(str(tmp_path), ["1"], [], 8, 0, "ema0", batch_size=8,
                                 guidance=["1", "2.5"])
  assert [(r["run"], r["nfe"], r["sampler"].split(", ")[-1]) for r in rows] == [
      ("student", 1, "told guidance w = 1"), ("student", 1, "told guidance w = 2.5")]
  out = tmp_path / "s.npz"
  proc = run_module("multistep_cm.sample", f"--workdir={student}", "--steps=1",
                    "--guidance=2", "--num_samples=8", f"--output={out}", "--batch_size=8")
  assert "told guidance w = 2" in proc.stdout and out.exists()
  proc = run_module("multistep_cm.sample", f"--workdir={student}", "--steps=1",
                    "--guidance=4", f"--output={tmp_path / 'x.npz'}", check=False)
  assert proc.returncode == 2, proc.stderr[-2000:]
  lines = [l for l in proc.stderr.splitlines() if "guidance" in l]
  assert lines == ["sample: error: --guidance=4 is outside [1, 3], the guidance range "
                   f"{student} was trained on"], proc.stderr[-2000:]
  assert "Traceback" not in proc.stderr
