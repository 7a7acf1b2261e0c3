"""A converted DiT as the trainer's teacher, with no code of its own.

A tiny diffusers `DiTTransformer2DModel` for the 8x8x1 digits (patch 2, 10 classes, learned
Σ, random weights) goes through `python -m multistep_cm.convert --from=dit`; the keys the
converter records (`teacher` in its JSON) and a two-line teacher file calling
`dit.from_settings` make `config.teacher`. The config validates (and so does the factory of
a published size), and a 2-step CD run through `train_and_evaluate` distils it into a student
of its own architecture that starts from its weights (about a minute on 2 CPU cores).
"""
import copy
import json

import numpy as np
import torch
from diffusers import DiTTransformer2DModel
from safetensors import torch as safetensors_torch

from multistep_cm import convert
from multistep_cm.config import checks as config_checks
from multistep_cm.training import loop as train
from helpers import run_module
from helpers import tiny_digits


def _converted_tiny_dit(tmp_path):
  """The converted weights, their JSON's record and a teacher file that builds the module."""
  torch.manual_seed(0)
  model = DiTTransformer2DModel(num_attention_heads=2, attention_head_dim=8, in_channels=1,
                                out_channels=2, num_layers=2, sample_size=8, patch_size=2,
                                num_embeds_ada_norm=10)
  with torch.no_grad():
    for block in model.transformer_blocks[1:]:
      block.norm1.emb.load_state_dict(model.transformer_blocks[0].norm1.emb.state_dict())
  src, out = str(tmp_path / "dit.safetensors"), str(tmp_path / "teacher.safetensors")
  safetensors_torch.save_file({k: v.contiguous() for k, v in model.state_dict().items()}, src)
  convert.main(["--from=dit", f"--src={src}", f"--out={out}", "--heads=2"])
  record = json.loads(open(convert.settings_path(out)).read())
  teacher_file = tmp_path / "tiny_dit.py"
  teacher_file.write_text("from multistep_cm.models import dit\n\n\ndef make():\n"
                          f"  return dit.from_settings({convert.settings_path(out)!r})\n")
  return out, record, f"{teacher_file}:make"


def _config(weights, record, module, **extra):
  config = tiny_digits("cd", steps=2, teacher=weights, checkpoint_every_steps=2,
                       sample_every_steps=0, log_every_steps=1, **extra)
  config.teacher.update({**record["teacher"], "module": module})
  config.init_from = ""  # the student is our UViT from scratch (not a run of ours to start from)
  for key, value in {"evals.every_steps": 0, "loss.teacher_steps_start": 8,
                     "loss.teacher_steps_end": 16, "loss.anneal_steps": 0}.items():
    section, name = key.split(".")
    config[section][name] = value
  return config


def test_the_converter_records_the_keys_and_the_config_validates(tmp_path):
  weights, record, module = _converted_tiny_dit(tmp_path)
  assert record["teacher"] == {"kind": "module", "frame": "vp", "prediction": "eps",
                               "schedule": "ddpm_linear", "time_scale": 999.0}
  assert record["factory"] is None  # not a published size
  config = _config(weights, record, module)
  config_checks.validate(config, num_devices=8, num_processes=1)
  published = copy.deepcopy(config)
  published.teacher.module = "multistep_cm.models.dit:dit_xl_2"
  config_checks.validate(published, num_devices=8, num_processes=1)


def test_a_converted_dit_is_distilled_by_cd(tmp_path):
  weights, record, module = _converted_tiny_dit(tmp_path)
  workdir = tmp_path / "cd2"
  config = _config(weights, record, module)
  config.teacher.student = "teacher"  # a tiny DiT student, starting as the teacher
  result = train.train_and_evaluate(config, str(workdir))
  assert result.step == 2 and not result.preempted
  loss = result.final_metrics["loss"]
  assert np.isfinite(loss) and loss > 0, result.final_metrics
  recorded = json.loads((workdir / "config.json").read_text())
  assert recorded["teacher"]["module"] == module


def test_the_command_refuses_in_one_line_as_a_child_process(tmp_path):
  """`python -m multistep_cm.convert` as a user runs it: a missing source, an unknown kind, an
  output of another format: exit 2, one line, no traceback."""
  weights = tmp_path / "dit.safetensors"
  safetensors_torch.save_file({"x_embedder.proj.weight": torch.zeros(1)}, str(weights))
  cases = [(["--from=dit", f"--src={tmp_path / 'nope.pt'}", "--out=o.safetensors"], 2,
            "no such file"),
           (["--from=unet", f"--src={weights}", "--out=o.safetensors"], 2, "--from"),
           (["--from=dit", f"--src={weights}", f"--out={tmp_path / 'o.txt'}"], 2,
            "must end in .safetensors or .npz")]
  for args, code, fragment in cases:
    proc = run_module("multistep_cm.convert", *args, check=False, devices=1)
    lines = [line for line in proc.stderr.splitlines() if line.startswith("convert: error: ")]
    assert proc.returncode == code and "Traceback" not in proc.stderr, proc.stderr[-2000:]
    assert len(lines) == 1 and fragment in lines[0], proc.stderr[-2000:]
