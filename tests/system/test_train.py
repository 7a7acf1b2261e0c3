"""The training system on 8 simulated CPU devices: main job, sharding, resume, CD from a teacher.

Small configs (a tiny digits UViT, the mixture MLP) keep each run to seconds.
"""
import glob
import json
import os

import jax
import numpy as np
import pytest

from multistep_cm import compile_report
from multistep_cm.config import build as config_build
from multistep_cm.config import checks as config_checks
from multistep_cm.runtime import checkpointing
from multistep_cm.runtime import hardware
from multistep_cm.runtime import sharding
from multistep_cm.training import loop as train
from multistep_cm.training import optim
from multistep_cm.training import step as train_step

from helpers import abstract_params
from helpers import file_config
from helpers import read_scalars
from helpers import run_main
from helpers import set_keys
from helpers import tiny_digits
from helpers import tiny_mixture


def test_main_trains_sharded_and_logs_to_tensorboard(tmp_path):
  """The main job end to end on a 2x4 mesh: loss finite and falling, scalars and images logged."""
  workdir = tmp_path / "digits"
  overrides = {
      "num_train_steps": 60, "batch_size": 32, "log_every_steps": 10, "mesh.data": 2,
      "mesh.fsdp": 4, "sample_every_steps": 30, "sample_num": 4, "sample_steps": 4,
      "checkpoint_every_steps": 30}
  run_main("configs/digits_diffusion.py", workdir, overrides)
  scalars, images = read_scalars(workdir)
  for tag in ("loss", "grad_norm", "learning_rate", "steps_per_sec", "examples_per_sec",
              "tflops_per_device"):
    assert tag in scalars, (tag, sorted(scalars))
  losses = [v for _, v in scalars["loss"]]
  assert all(np.isfinite(losses)) and len(losses) == 6
  assert np.mean(losses[-2:]) < np.mean(losses[:2]), losses
  assert any("samples" in t for t in images), images
  assert os.path.exists(workdir / "config.json")
  assert json.load(open(workdir / "config.json"))["mesh"] == {"data": 2, "fsdp": 4}
  assert glob.glob(str(workdir / "samples_step60.png"))
  # The last step's checkpoint restores onto the 2x4 mesh with parameters sharded over fsdp.
  ckpt, step = checkpointing.resolve(str(workdir))
  assert step == 60
  config = file_config("configs/digits_diffusion.py", overrides)
  state, _ = ckpt.restore_state(step, train_step.StepBuilder.from_config(config).layout.abstract)
  params = jax.tree.leaves(state.params)
  assert all(np.all(np.isfinite(np.asarray(p))) for p in params)
  sharded = [p for p in params if "fsdp" in str(p.sharding.spec)]
  assert sum(p.size for p in sharded) > 0.9 * sum(p.size for p in params)
  for p in sharded:
    assert p.addressable_shards[0].data.size * 4 == p.size


def test_parameters_are_sharded_over_fsdp():
  config = tiny_digits()
  mesh = sharding.make_mesh(config.mesh)
  model = config_build.get_model(config)
  tx, _ = optim.make_optimizer(config.optimizer, config.num_train_steps)
  layout = train_step.state_layout(model, tx, mesh, 1)
  specs = [s.spec for s in jax.tree.leaves(layout.shardings.params)]
  assert any("fsdp" in str(spec) for spec in specs)
  # Adam's moments follow their parameters.
  mu = layout.shardings.opt_state[1][0].mu
  assert jax.tree.leaves(mu)[0] == jax.tree.leaves(layout.shardings.params)[0]


def test_logged_mfu_and_the_compile_report_count_the_same_flops(tmp_path, monkeypatch):
  """The trainer's logged MFU and tflops_per_device use the model FLOPs per device of the
  compile report (`model_flops_per_chip`): `mfu * peak / steps_per_sec` gives them back at
  every log step. With remat on, the step's hardware FLOPs (recomputed forwards included)
  differ from its model FLOPs, and XLA's figure differs from both, so a trainer counting
  either, or FLOPs over all devices instead of per device, would fail here."""
  peak = 1e12
  monkeypatch.setattr(hardware, "peak_flops_per_device", lambda *_: peak)
  config = tiny_digits("diffusion", steps=6, log_every_steps=2, sample_every_steps=0,
                       checkpoint_every_steps=0)
  config.model.remat = True
  train.train_and_evaluate(config, str(tmp_path))
  scalars, _ = read_scalars(str(tmp_path))
  report = compile_report.build_report(config, "cpu")
  expected = report["model_flops_per_chip"]
  assert report["chips"] == 8 and report["flops_exact"]
  assert report["hardware_flops_per_chip"] > 1.1 * expected  # remat recomputes forwards
  assert report["xla_flops_per_chip"] != pytest.approx(expected, rel=1e-4)
  # The speed the trainer divided by: its examples_per_sec / batch_size. Its steps_per_sec
  # is that too; the progress hooks (runtime/metric_log.py: clu's ReportProgress without a
  # writer, or its own Progress) log theirs as text only, so the tag is the trainer's.
  logged_speeds = {}
  for step, value in scalars["steps_per_sec"]:
    logged_speeds.setdefault(step, []).append(value)
  steps = [s for s, _ in scalars["mfu"]]
  assert steps == [2, 4, 6]
  assert [s for s, _ in scalars["examples_per_sec"]] == steps
  assert [s for s, _ in scalars["tflops_per_device"]] == steps
  for (step, mfu), (_, examples_per_sec), (_, tflops) in zip(
      scalars["mfu"], scalars["examples_per_sec"], scalars["tflops_per_device"]):
    steps_per_sec = examples_per_sec / config.batch_size
    assert any(v == pytest.approx(steps_per_sec, rel=1e-6) for v in logged_speeds[step])
    # float32 scalars: a relative error of ~1e-7 each.
    assert mfu * peak / steps_per_sec == pytest.approx(expected, rel=1e-5)
    assert tflops * 1e12 / steps_per_sec == pytest.approx(expected, rel=1e-5)


def test_resume_equals_uninterrupted(tmp_path):
  """2k steps straight == k steps, restart, k more: identical parameters (CPU is deterministic)."""
  straight = train.train_and_evaluate(tiny_mixture(steps=40), str(tmp_path / "straight"))
  assert straight.step == 40
  first = train.train_and_evaluate(tiny_mixture(steps=40), str(tmp_path / "resumed"),
                                   stop_after=20)
  assert first.step == 20
  second = train.train_and_evaluate(tiny_mixture(steps=40), str(tmp_path / "resumed"))
  assert second.step == 40
  a_ckpt, a_step = checkpointing.resolve(str(tmp_path / "straight"))
  b_ckpt, b_step = checkpointing.resolve(str(tmp_path / "resumed"))
  assert a_step == b_step == 40
  abstract = abstract_params(tiny_mixture())
  pa = a_ckpt.restore_params(40, abstract, "params")
  pb = b_ckpt.restore_params(40, abstract, "params")
  for x, y in zip(jax.tree.leaves(pa), jax.tree.leaves(pb)):
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def test_cd_starts_from_a_diffusion_checkpoint(tmp_path):
  teacher_dir = str(tmp_path / "teacher")
  train.train_and_evaluate(tiny_mixture("diffusion", steps=30), teacher_dir)
  config = tiny_mixture("cd", steps=20, teacher=teacher_dir)
  assert config.init_from == teacher_dir and config.teacher_checkpoint == teacher_dir
  result = train.train_and_evaluate(config, str(tmp_path / "cd"))
  assert result.step == 20 and np.isfinite(result.final_metrics["loss"])
  assert "teacher_steps" in result.final_metrics
  assert "loss_per_segment/1" in result.final_metrics
  # The student's checkpoint holds the student only: no teacher inside.
  ckpt, step = checkpointing.resolve(str(tmp_path / "cd"))
  assert set(ckpt.manager.item_metadata(step).keys()) == set(checkpointing.ITEMS)


def test_student_initialised_from_teacher_weights(tmp_path):
  """The student starts from the teacher's EMA weights (init_from): after one step at learning
  rate 0 its parameters are still exactly those."""
  teacher_dir = str(tmp_path / "teacher")
  train.train_and_evaluate(tiny_mixture("diffusion", steps=20), teacher_dir)
  config = tiny_mixture("ct", steps=1, teacher=teacher_dir)
  config.optimizer.learning_rate = 0.0
  train.train_and_evaluate(config, str(tmp_path / "ct"))
  t_ckpt, t_step = checkpointing.resolve(teacher_dir)
  s_ckpt, s_step = checkpointing.resolve(str(tmp_path / "ct"))
  abstract = abstract_params(config)
  teacher = t_ckpt.restore_params(t_step, abstract, "ema0")
  student = s_ckpt.restore_params(s_step, abstract, "params")
  for x, y in zip(jax.tree.leaves(teacher), jax.tree.leaves(student)):
    np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=1e-6, atol=1e-7)


def test_staged_pipeline_config_wires_the_teacher(tmp_path):
  from configs import digits_pipeline  # pylint: disable=g-import-not-at-top
  config = digits_pipeline.get_config("steps=2")
  assert tuple(config.stage_order) == ("teacher", "cd2")
  stage = train.resolve_stage(config.stages.cd2, str(tmp_path))
  assert stage.teacher_checkpoint == str(tmp_path / "teacher") == stage.init_from


@pytest.mark.parametrize("name,arg", [
    ("digits_pipeline", None), ("digits_pipeline", "arch=adm"), ("digits_pipeline", "arch=dit"),
    ("digits_study", "anystep=segment_start,student_train_steps=10"),
    ("digits_diffusion", None), ("digits_ct", "steps=2"), ("digits_cd", "teacher=/t"),
    ("mixture_diffusion", None), ("mixture_cd", "teacher=/t"), ("mixture_ct", None),
    ("mixture_direct", "teacher=/t"), ("imagenet64_diffusion", "size=large"),
    ("imagenet128_diffusion", None), ("imagenet64_ct", "steps=16"),
    ("imagenet64_cd", "size=large,teacher=/t"), ("imagenet128_ct", "size=large,steps=1"),
    ("imagenet128_cd", "teacher=/t,guidance=0.5"), ("digits_t2i", "guidance=0/3")])
def test_every_shipped_config_validates(name, arg):
  """Each config file (with the variants the docs name) passes the checks on 8 devices."""
  import importlib  # pylint: disable=g-import-not-at-top
  config = importlib.import_module(f"configs.{name}").get_config(arg)
  config_checks.validate_run(config, num_devices=8, num_processes=1)
  if name == "digits_study":
    any_step = config.stages.cdany
    assert tuple(any_step.loss.anystep_counts) == (1, 2, 4, 8)
    assert any_step.num_train_steps == 4 * config.stages.cd1.num_train_steps


@pytest.mark.parametrize("key,value,match", [
    ("batch_size", 12, "batch_size"),
    ("loss.mode", "pd", "loss.mode"),
    ("loss.student_steps", 3, "student_steps"),
    ("model.preset", "nope", "model"),
    ("schedule.name", "linear", "schedule.name"),
    ("data.dataset", "cifar", "data.dataset"),
    # Text conditioning: text on class data, class ids with text, a wrong encoder width.
    ({"data.text_dim": 64, "data.text_len": 8, "data.num_classes": 0}, None,
     "needs text-image data"),
    ({"data.dataset": "captioned_digits", "data.text_dim": 64, "data.text_len": 8}, None,
     "num_classes must be 0"),
    ({"data.dataset": "captioned_digits", "data.text_dim": 32, "data.text_len": 8,
      "data.num_classes": 0}, None, "must be 64 and 8"),
    ({"data.text_dim": 64, "data.num_classes": 0, "data.dataset": "captioned_digits"}, None,
     "must be 64 and 8"),
])
def test_config_validation_names_the_key(key, value, match):
  overrides = key if isinstance(key, dict) else {key: value}
  config = set_keys(tiny_digits("ct", teacher="x"), overrides)
  with pytest.raises(config_checks.ConfigError, match=match):
    config_checks.validate(config, num_devices=8, num_processes=1)


def test_main_reports_config_errors_in_one_line(tmp_path):
  proc = run_main("configs/digits_cd.py", tmp_path / "x", check=False)
  assert proc.returncode == 2
  assert "config.teacher_checkpoint" in proc.stderr
  assert "Traceback" not in proc.stderr


def test_gradient_accumulation_equals_the_full_batch():
  """`grad_accum_steps = 4` on a batch sharded over the 8 devices gives the update, loss and
  metrics of one full-batch step, for a loss that is a mean over examples (and draws nothing,
  so the micro-batches' own noise keys do not matter)."""
  mesh = sharding.make_mesh(tiny_digits().mesh, jax.devices())
  batch_sharding = sharding.batch_sharding(mesh, 1)
  rng = np.random.default_rng(0)
  params = {"w": jax.numpy.asarray(rng.normal(size=(3, 2)), jax.numpy.float32)}
  batch = {"x": jax.device_put(rng.normal(size=(64, 3)).astype(np.float32), batch_sharding),
           "label": jax.device_put(np.arange(64, dtype=np.int32) % 5, batch_sharding)}

  def loss_fn(p, teacher_params, b, step, key):
    del teacher_params, step, key
    per_example = jax.numpy.sum(jax.numpy.tanh(b["x"] @ p["w"]) ** 2, axis=1)
    per_example = per_example * (1.0 + b["label"])  # rows differ: a wrong split shows
    return jax.numpy.mean(per_example), {"loss": jax.numpy.mean(per_example),
                                          "max_label": jax.numpy.max(b["label"]) * 1.0}

  outs = []
  for accum in (1, 4):
    config = tiny_digits(grad_accum_steps=accum)
    tx, lr = optim.make_optimizer(config.optimizer, config.num_train_steps)
    state = train_step.create_state(params, tx, jax.random.PRNGKey(0), 1)
    step = jax.jit(train_step.make_train_step(config, loss_fn, tx, lr))
    outs.append(jax.device_get(step(state, batch, None)))
  (full, full_metrics), (acc, acc_metrics) = outs
  np.testing.assert_allclose(acc.params["w"], full.params["w"], rtol=1e-5, atol=1e-7)
  np.testing.assert_allclose(acc_metrics["loss"], full_metrics["loss"], rtol=1e-5)
  np.testing.assert_allclose(acc_metrics["grad_norm"], full_metrics["grad_norm"], rtol=1e-5)
  # Metrics are means over micro-batches: each holds rows j, j + 4, ..., so every label.
  assert acc_metrics["max_label"] == full_metrics["max_label"] == 4.0
  with pytest.raises(config_checks.ConfigError, match="grad_accum_steps"):
    config_checks.validate(tiny_digits(grad_accum_steps=3), num_devices=8, num_processes=1)
