"""A teacher of your own through the main job and `sample`, end to end.

The teachers: tests/outside_teachers.py's SD3-convention flow module (our digits UViT
behind a flow velocity), fine-tuned here as a diffusion model first, and EDM's ADM UNet
(models/adm.py) converted from an EDM-named PyTorch state dict; random weights written as
.safetensors files. `main` distils each into a 2-step CD student of the teacher's own
architecture, and `sample` draws from that student; weights that do not fit the module are
refused in one line (exit 2) before the workdir records anything. A flow-matching teacher
trained here is distilled the same way.
"""
import json
import os

from flax import traverse_util
import jax
import numpy as np
import torch

from multistep_cm.models import partitioning
from multistep_cm.sampling import runs
from multistep_cm.teachers import weights as teacher_weights
from multistep_cm.training import loop as train
from multistep_cm.training import step as train_step
from helpers import assert_one_line_error
from helpers import run_main
from helpers import run_module
from helpers import TESTS
from helpers import tiny_digits
import outside_teachers
import torch_adm

EXIT_CONFIG = 2


def _teacher_file(path, drop=None):
  params = partitioning.unbox(train_step.init_params(outside_teachers.inner_network(),
                                                     jax.random.PRNGKey(0)))
  flat = {k: np.asarray(v) for k, v in
          traverse_util.flatten_dict({"inner": params}, sep="/").items() if k != drop}
  teacher_weights.write_safetensors(str(path), flat)
  return str(path), sorted(flat)


def _overrides(weights, **extra):
  module = os.path.join(TESTS, "outside_teachers.py") + ":flow_sd3"
  return {"teacher_checkpoint": weights, "teacher.kind": "module", "teacher.module": module,
          "teacher.frame": "flow", "teacher.prediction": "velocity",
          "teacher.flow_time": "data_at_0", "teacher.time_scale": 1000.0,
          "num_train_steps": 2, "batch_size": 16, "checkpoint_every_steps": 2,
          "log_every_steps": 1, "sample_every_steps": 0, "evals.every_steps": 0,
          "loss.teacher_steps_start": 8, "loss.teacher_steps_end": 16,
          "loss.anneal_steps": 0, **extra}


def test_a_module_is_trained_here_then_distilled_from_its_run_and_sampled(tmp_path):
  """The module trained (fine-tuned from its weights file) as a diffusion model on the
  digits, `teacher.student='teacher'` with loss.mode='diffusion'; then that run, named as
  `teacher_checkpoint`, is distilled by `main` into a 2-step CD student of the module's own
  architecture, which `sample` draws from."""
  weights, _ = _teacher_file(tmp_path / "teacher.safetensors")
  teacher = tmp_path / "teacher"
  config = tiny_digits(steps=2, checkpoint_every_steps=2, sample_every_steps=0)
  config.evals.every_steps = 0
  config.teacher.update({k.split(".", 1)[1]: v for k, v in _overrides(weights).items()
                         if k.startswith("teacher.")})
  config.teacher.student = "teacher"
  config.teacher_checkpoint = weights
  train.train_and_evaluate(config, str(teacher))
  # It started from the file's weights: two steps away from them, far from a fresh start.
  trained = runs.load_run(str(teacher), "params").params
  start = teacher_weights.read(weights)
  fresh = partitioning.unbox(train_step.init_params(outside_teachers.inner_network(),
                                                    jax.random.PRNGKey(5)))
  distance = lambda a, b: sum(float(np.sum((np.asarray(x) - np.asarray(y)) ** 2))
                              for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)))
  assert distance(trained["net"], start) < 1e-3 * distance(trained["net"], {"inner": fresh})

  workdir = tmp_path / "cd2"
  run_main("configs/digits_cd.py:steps=2", workdir,
           _overrides(str(teacher), **{"teacher.student": "teacher"}))
  recorded = json.loads((workdir / "config.json").read_text())
  assert recorded["teacher"]["student"] == "teacher"
  out = tmp_path / "samples.npz"
  run_module("multistep_cm.sample", f"--workdir={workdir}", "--num_samples=4",
             f"--output={out}", "--progress=false", timeout=300)
  images = np.load(out)["images"]
  assert images.shape[0] == 4 and images.dtype == np.uint8
  assert os.path.exists(str(out).removesuffix(".npz") + ".png")


def test_weights_that_do_not_fit_the_module_are_refused_before_the_record(tmp_path):
  weights, keys = _teacher_file(tmp_path / "teacher.safetensors", drop=None)
  missing = keys[0]
  weights, _ = _teacher_file(tmp_path / "partial.safetensors", drop=missing)
  workdir = tmp_path / "refused"
  proc = run_main("configs/digits_cd.py:steps=2", workdir, _overrides(weights), check=False)
  assert_one_line_error(proc, EXIT_CONFIG, "config.teacher_checkpoint", f"{missing} is "
                        "missing")
  assert not (workdir / "config.json").exists()


def test_a_flow_matching_teacher_trained_here_is_distilled_and_sampled(tmp_path):
  """loss.prediction='velocity' on the flow_matching schedule trains a rectified-flow teacher
  (§17.5); a CD student of the same parameterisation distils it and samples."""
  flow = {"loss.prediction": "velocity", "schedule.name": "flow_matching",
          "schedule.kwargs.shift": 2.0, "sample_every_steps": 0, "evals.every_steps": 0}
  teacher = tmp_path / "teacher"
  train.train_and_evaluate(tiny_digits(steps=2, checkpoint_every_steps=2, **flow),
                           str(teacher))
  student = tmp_path / "cd2"
  train.train_and_evaluate(tiny_digits("cd", steps=2, checkpoint_every_steps=2,
                                       teacher=str(teacher), **flow), str(student))
  out = tmp_path / "samples.npz"
  run_module("multistep_cm.sample", f"--workdir={student}", "--num_samples=4",
             f"--output={out}", "--progress=false", timeout=300)
  images = np.load(out)["images"]
  assert images.shape[0] == 4 and len(np.unique(images)) > 1


def test_a_converted_edm_teacher_is_distilled_and_sampled(tmp_path):
  """EDM's ADM UNet (models/adm.py), its weights converted from an EDM-named PyTorch state
  dict by `python -m multistep_cm.convert --from=edm`, distilled through `main` with no code of its own (frame 've', prediction 'x', the
  student on EDM's schedule, of the teacher's own architecture), then sampled."""
  torch.manual_seed(0)
  torch.save(torch_adm.TorchADM(**outside_teachers.TINY_ADM).state_dict(), tmp_path / "edm.pt")
  weights = str(tmp_path / "edm.safetensors")
  run_module("multistep_cm.convert", "--from=edm", f"--src={tmp_path / 'edm.pt'}",
             f"--out={weights}", timeout=300)
  record = json.loads((tmp_path / "edm.json").read_text())
  assert record["teacher"] == {"kind": "module", "frame": "ve", "prediction": "x"}
  assert record["settings"]["attn_resolutions"] == [4] and record["factory"] is None
  overrides = _overrides(weights, **{
      "teacher.module": os.path.join(TESTS, "outside_teachers.py") + ":tiny_adm",
      "teacher.frame": "ve", "teacher.prediction": "x", "teacher.flow_time": "",
      "teacher.time_scale": 1.0, "teacher.student": "teacher", "schedule.name": "edm"})
  workdir = tmp_path / "cd2"
  run_main("configs/digits_cd.py:steps=2", workdir, overrides)
  out = tmp_path / "samples.npz"
  run_module("multistep_cm.sample", f"--workdir={workdir}", "--num_samples=4",
             f"--output={out}", "--progress=false", timeout=300)
  assert np.load(out)["images"].shape == (4, 8, 8, 1)
