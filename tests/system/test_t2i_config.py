"""The paper's text-to-image configs (configs/t2i512_*.py) against the paper's stated
settings (docs/maths.md §1.2, §3.2, §3.6, §5.5, §7.1-7.3; the numbers are written here
from those sections, not read from config_base), and the T2I CD step compiled for a small TPU slice.
"""
import importlib.util
import json
import math

import jax
import flax.linen as nn
import jax.numpy as jnp
import numpy as np
import pytest

from multistep_cm import compile_report
from multistep_cm.config import base as config_base
from multistep_cm.config import build as config_build
from multistep_cm.config import checks as config_checks
from multistep_cm.models import presets
from multistep_cm.runtime import flops
from multistep_cm.training import step as train_step

from helpers import file_config
from helpers import run_module


def _logsnr_cosine(t, lmin=-15.0, lmax=15.0):  # §1.2
  t_min, t_max = math.atan(math.exp(-lmax / 2)), math.atan(math.exp(-lmin / 2))
  return -2 * np.log(np.tan(t_min + t * (t_max - t_min)))


@pytest.mark.parametrize("steps", [4, 8, 16])
def test_t2i_cd_config_carries_the_papers_settings(steps):
  c = file_config(f"configs/t2i512_cd.py:steps={steps},teacher=/t")
  config_checks.validate(c, num_devices=256, num_processes=64)  # 256 v5e chips (§7.3)
  assert c.loss.mode == "cd" and c.loss.student_steps == steps  # CD only (§7.1)
  assert (c.batch_size, c.num_train_steps) == (2048, 30_000)  # §7.1
  # Teacher steps fixed at 256, no anneal (§3.2): N(i) = 256 at every step.
  assert (c.loss.teacher_steps_start, c.loss.teacher_steps_end) == (256, 256)
  assert c.loss.anneal_steps == 0
  assert (c.loss.huber_epsilon, c.loss.eta) == (1.0, 0.75)  # §3.6, §5.5
  assert c.loss.guidance_scale == 0.5  # Table 6's g = 0.5 teacher (our default of its two)
  assert (c.init_from, c.teacher_checkpoint) == ("/t", "/t")  # started from the teacher
  # Interpolated cosine 32 -> 512 at 512 (§1.2): logSNR(t) = logsnr_cosine(t) - 8 t log 2.
  t = np.linspace(0.0, 1.0, 11)
  schedule = config_build.get_schedule(c)
  np.testing.assert_allclose(schedule.logsnr(jnp.asarray(t)),
                             _logsnr_cosine(t) - 8 * t * np.log(2), rtol=1e-5, atol=1e-4)
  # §7.2: 512 x 512 RGB, mid stack 16 transformer blocks @ 4096 channels, text-conditioned.
  model = config_build.get_model(c)
  assert (model.image_size, model.num_channels, model.num_classes) == (512, 3, 0)
  assert (model.mid_blocks, model.mid_channels) == (16, 4096)
  assert model.channels == (128, 256, 1024, 2048)
  assert (model.text_dim, model.text_len) == (c.data.text_dim, c.data.text_len) != (0, 0)
  assert c.model.dtype == "bfloat16" and c.model.remat and (c.mesh.data, c.mesh.fsdp) == (1, -1)
  # The compile report's default speed is the paper's T2I row: 0.71 steps/s on 256 chips.
  assert compile_report.PAPER_STEPS_PER_SEC[("t2i_512", "cd")] == 0.71
  assert compile_report.PAPER_CHIPS["t2i_512"] == 256


def test_t2i_diffusion_config_and_refusals():
  c = file_config("configs/t2i512_diffusion.py")
  config_checks.validate(c, num_devices=256, num_processes=64)
  assert c.loss.mode == "diffusion" and c.batch_size == 2048 and c.loss.label_dropout > 0
  assert c.data.dataset.startswith("tfds:text_images/")  # the user's prepared data
  with pytest.raises(ValueError, match="CD only"):
    config_base.t2i_config("ct")
  with pytest.raises(ValueError, match="unknown config argument"):
    file_config("configs/t2i512_diffusion.py:steps=4")


def test_the_cfg_teacher_costs_one_more_forward_per_example():
  """Model FLOPs of the tiny T2I CD step with guidance 0.5 minus those at guidance 0 are
  exactly one forward pass of the network over the batch: the teacher's unconditional
  half (FLOPs count matmuls only, so the guidance combination adds none)."""
  def step_flops(guidance):
    c = file_config(f"tests/tiny_t2i_config.py:guidance={guidance}")
    c.teacher_checkpoint = "/t"
    c.mesh.data, c.mesh.fsdp = -1, 1
    c.model.remat = False  # model FLOPs only: one trace
    return train_step.StepBuilder.from_config(c).flops()[0].flops, c
  guided, c = step_flops(0.5)
  plain, _ = step_flops(0.0)
  model = config_build.get_model(c)
  z, logsnr, text = presets.input_specs(model, c.batch_size)
  assert set(text) == {"text_embedding", "text_mask"}
  params = {"params": nn.meta.unbox(presets.abstract_variables(model, 1)["params"])}
  forward = jax.make_jaxpr(lambda p, z, l, y: model.apply(p, z, l, y, train=False))(
      params, z, logsnr, text)
  assert guided - plain == flops.count_flops(forward).flops > 0


@pytest.mark.skipif(importlib.util.find_spec("libtpu") is None,
                    reason="compiling for a TPU topology needs libtpu: pip install -e '.[tpu]'")
def test_t2i_cd_step_compiles_for_a_small_tpu_slice(tmp_path):
  out = tmp_path / "report.json"
  run_module("multistep_cm.compile_report", "--config=tests/tiny_t2i_config.py",
             "--topology=v5e-4", "--steps_per_sec=1", f"--json={out}", devices=None,
             timeout=300)
  r = json.loads(out.read_text())
  assert (r["config"], r["mode"], r["chips"], r["device_kind"]) == (
      "t2i_512", "cd", 4, "TPU v5 lite")
  assert r["mesh"] == {"data": 1, "fsdp": 4} and r["fits"]
  # The batch per chip is 16 / 4 examples of image [8, 8, 3], text [4, 16], mask [4], label.
  assert r["args_bytes"]["batch"] == 16 // 4 * 4 * (8 * 8 * 3 + 4 * 16 + 4 + 1)
  assert r["args_bytes"]["teacher"] == r["args_bytes"]["params"] > 0
