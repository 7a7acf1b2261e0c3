"""Shared test helpers: tiny configs, running the CLIs, reading TensorBoard event files."""
import glob
import os
import subprocess
import sys

import jax
import numpy as np

from multistep_cm import config_base
from multistep_cm import train

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def set_keys(config, overrides):
  """Sets `{dotted.key: value}` in `config`, as `--config.key=value` does; returns it."""
  for key, value in overrides.items():
    *parents, leaf = key.split(".")
    node = config
    for parent in parents:
      node = node[parent]
    node[leaf] = value
  return config


def tiny_digits(mode="diffusion", steps=40, **kw):
  c = config_base.digits_config(mode, student_steps=kw.pop("student_steps", 2),
                                teacher=kw.pop("teacher", ""))
  c.num_train_steps = steps
  c.batch_size = 16
  c.log_every_steps = 10
  c.checkpoint_every_steps = 20
  c.sample_every_steps = 20
  c.sample_num = 4
  c.sample_steps = 4
  c.mesh.data, c.mesh.fsdp = 2, 4
  c.optimizer.warmup_steps = 5
  c.loss.teacher_steps_start, c.loss.teacher_steps_end = 8, 16
  c.loss.anneal_steps = 10
  for k, v in kw.items():
    c[k] = v
  return c


def tiny_mixture(mode="diffusion", steps=60, **kw):
  c = config_base.mixture_config(mode, student_steps=kw.pop("student_steps", 2),
                                 teacher=kw.pop("teacher", ""))
  c.num_train_steps = steps
  c.batch_size = 64
  c.model.width, c.model.depth = 32, 2
  c.log_every_steps = 10
  c.checkpoint_every_steps = 30
  c.mesh.data, c.mesh.fsdp = 2, 4
  c.optimizer.warmup_steps = 5
  c.loss.teacher_steps_start, c.loss.teacher_steps_end = 8, 16
  c.loss.anneal_steps = 20
  for k, v in kw.items():
    c[k] = v
  return c


def read_scalars(workdir):
  """Scalars `{tag: [(step, value)]}` and image tags from the event files (tensorboard's reader).

  clu writes TF2 summaries: scalars are 0-d float tensors, images are string tensors.
  """
  from tensorboard.backend.event_processing import event_accumulator  # pylint: disable=g-import-not-at-top
  from tensorboard.util import tensor_util  # pylint: disable=g-import-not-at-top
  scalars, images = {}, set()
  for path in glob.glob(os.path.join(workdir, "events.out.tfevents.*")):
    acc = event_accumulator.EventAccumulator(path, size_guidance={"tensors": 0})
    acc.Reload()
    for tag in acc.Tags()["tensors"]:
      for event in acc.Tensors(tag):
        value = tensor_util.make_ndarray(event.tensor_proto)
        if value.dtype.kind in "fiu" and value.size == 1:
          scalars.setdefault(tag, []).append((event.step, float(value)))
        elif value.dtype.kind in "SO":
          images.add(tag)
  return scalars, images


def abstract_params(config):
  return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype),
                      train.partitioning.unbox(train.abstract_params(train.get_model(config))))


def run_module(module, *args, check=True, devices=8, timeout=600):
  """`python -m module args...` in a fresh process with `devices` simulated CPU devices."""
  env = dict(os.environ, XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}",
             JAX_PLATFORMS="cpu", TF_CPP_MIN_LOG_LEVEL="2")
  proc = subprocess.run([sys.executable, "-m", module, *args], cwd=REPO, env=env,
                        capture_output=True, text=True, timeout=timeout)
  if check and proc.returncode != 0:
    raise AssertionError(f"exit {proc.returncode}\n{proc.stderr[-4000:]}")
  return proc


def run_main(config_path, workdir, *overrides, check=True):
  return run_module("multistep_cm.main", f"--config={config_path}", f"--workdir={workdir}",
                    *overrides, check=check)
