"""Shared test helpers: tiny configs, the commands in child processes, TensorBoard scalars.

Configs. A tiny run is a config file plus `{dotted.key: value}` overrides, so the same run
is built in this process (`file_config(path, overrides)`) and on a command line
(`run_main(path, workdir, overrides)`, which passes each override as `--config.key=value`).
`tiny_digits` and `tiny_mixture` are the small runs most tests train in-process.

Child processes. Every command a test starts is `python -m <module>` with the environment
of `child_env`: JAX on `devices` simulated CPU devices (as tests/conftest.py sets up this
process), quiet TensorFlow, this repository and tests/ on the path, and optionally a
persistent compilation cache. `run_module` / `run_main` run one to its end; `started_module`
/ `started_main` run one in the background.
"""
import contextlib
import glob
import importlib.util
import os
import socket
import subprocess
import sys

from flax import traverse_util
import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from PIL import Image

from multistep_cm import convert
from multistep_cm.config import base as config_base
from multistep_cm.config import build as config_build
from multistep_cm.models import partitioning
from multistep_cm.models import vae as vae_lib
from multistep_cm.runtime import metric_log
from multistep_cm.training import step as train_step

TESTS = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(TESTS)
_DEVICE_COUNT_FLAG = "--xla_force_host_platform_device_count"

# --- configs ---------------------------------------------------------------------------------

# The mixture MLP at width 32 and depth 2 on the 2x4 mesh: every in-process and command-line
# mixture run of the tests starts from these.
TINY_MIXTURE = {
    "batch_size": 64, "model.width": 32, "model.depth": 2, "mesh.data": 2, "mesh.fsdp": 4,
    "optimizer.warmup_steps": 5, "log_every_steps": 10,
}
# A short teacher-step anneal for students (cd, ct, direct): 8 -> 16 teacher steps.
TINY_ANNEAL = {"loss.teacher_steps_start": 8, "loss.teacher_steps_end": 16}


def set_keys(config, overrides):
  """Sets `{dotted.key: value}` in `config`, as `--config.key=value` does; returns it."""
  for key, value in overrides.items():
    *parents, leaf = key.split(".")
    node = config
    for parent in parents:
      node = node[parent]
    node[leaf] = value
  return config


def file_config(path, overrides=None):
  """The config of a config file, `path` or `path:arg` as `--config=` takes it (relative to
  the repository), with `{dotted.key: value}` overrides set."""
  path, _, arg = str(path).partition(":")
  full = path if os.path.isabs(path) else os.path.join(REPO, path)
  spec = importlib.util.spec_from_file_location(
      f"_config_{os.path.splitext(os.path.basename(path))[0]}", full)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return set_keys(module.get_config(arg or None), overrides or {})


def tiny_digits(mode="diffusion", steps=40, **kw):
  """The digits UViT on 8x8 digits, batch 16 on the 2x4 mesh; `kw` sets top-level keys."""
  c = config_base.digits_config(mode, student_steps=kw.pop("student_steps", 2),
                                teacher=kw.pop("teacher", ""))
  set_keys(c, {"num_train_steps": steps, "batch_size": 16, "log_every_steps": 10,
               "checkpoint_every_steps": 20, "sample_every_steps": 20, "sample_num": 4,
               "sample_steps": 4, "mesh.data": 2, "mesh.fsdp": 4,
               "optimizer.warmup_steps": 5, "loss.anneal_steps": 10, **TINY_ANNEAL})
  return set_keys(c, kw)


def tiny_mixture(mode="diffusion", steps=60, **kw):
  """The mixture run of `TINY_MIXTURE`; `kw` sets top-level keys."""
  c = config_base.mixture_config(mode, student_steps=kw.pop("student_steps", 2),
                                 teacher=kw.pop("teacher", ""))
  set_keys(c, {**TINY_MIXTURE, "num_train_steps": steps, "checkpoint_every_steps": 30,
               "loss.anneal_steps": 20, **TINY_ANNEAL})
  return set_keys(c, kw)


def data_config(**data):
  """A config of `data` over the defaults (image_size None, a TFDS dataset's own size,
  unless given): what `config_build.make_source` reads."""
  data.setdefault("image_size", None)
  return config_base.with_defaults(ml_collections.ConfigDict({"seed": 0, "data": data}))


def abstract_params(config):
  """The unboxed abstract parameters of the config's model (for restoring checkpoints)."""
  boxed = train_step.abstract_params(config_build.get_model(config))
  return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype),
                      partitioning.unbox(boxed))


# --- child processes -------------------------------------------------------------------------


def child_env(devices=8, cache=None, **extra):
  """The environment of every child process: JAX on `devices` simulated CPU devices (None:
  the platform's own count), quiet TensorFlow, the repository and tests/ importable, a
  persistent compilation cache at `cache` (if given), and `extra` on top."""
  xla_flags = [f for f in os.environ.get("XLA_FLAGS", "").split()
               if not f.startswith(_DEVICE_COUNT_FLAG)]
  if devices is not None:
    xla_flags.append(f"{_DEVICE_COUNT_FLAG}={devices}")
  path = [REPO, TESTS] + [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]
  env = dict(os.environ, JAX_PLATFORMS="cpu", TF_CPP_MIN_LOG_LEVEL="2",
             PYTHONPATH=os.pathsep.join(path))
  env.pop("XLA_FLAGS", None)
  if xla_flags:
    env["XLA_FLAGS"] = " ".join(xla_flags)
  if cache:
    env.update(JAX_COMPILATION_CACHE_DIR=str(cache), JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0")
  env.update({k: str(v) for k, v in extra.items()})
  return env


def module_command(module, *args):
  return [sys.executable, "-m", module, *map(str, args)]


def main_args(config, workdir, overrides=None, *flags):
  """The main job's arguments: `--config`, `--workdir`, a `--config.key=value` per override."""
  return [f"--config={config}", f"--workdir={workdir}",
          *(f"--config.{k}={v}" for k, v in (overrides or {}).items()), *flags]


def run_module(module, *args, check=True, devices=8, cache=None, env=None, timeout=600):
  """`python -m module args...` to its end in `child_env(devices, cache, **env)`.

  With `check`, a non-zero exit fails the test showing the end of stderr.
  """
  proc = subprocess.run(module_command(module, *args), cwd=REPO, capture_output=True,
                        text=True, timeout=timeout,
                        env=child_env(devices, cache, **(env or {})))
  if check and proc.returncode != 0:
    raise AssertionError(f"{module}: exit {proc.returncode}\n{proc.stderr[-4000:]}")
  return proc


def run_main(config, workdir, overrides=None, *flags, **kw):
  """`python -m multistep_cm.main` on `config` (a path, or `path:arg`) with `overrides`;
  `kw` as for `run_module`."""
  return run_module("multistep_cm.main", *main_args(config, workdir, overrides, *flags), **kw)


def popen_module(module, *args, log, devices=8, cache=None, env=None):
  """`python -m module args...` started in the background, stdout and stderr into `log` (an
  open file)."""
  return subprocess.Popen(module_command(module, *args), cwd=REPO, stdout=log,
                          stderr=subprocess.STDOUT, env=child_env(devices, cache, **(env or {})))


@contextlib.contextmanager
def started_module(module, *args, log_path, **kw):
  """`popen_module` logging into `log_path`; the process is killed (if still running) and
  reaped when the block ends."""
  with open(log_path, "w") as log:
    proc = popen_module(module, *args, log=log, **kw)
  try:
    yield proc
  finally:
    if proc.poll() is None:
      proc.kill()
    proc.wait()


def started_main(config, workdir, overrides=None, *flags, log_path, **kw):
  """The main job in the background (see `started_module`)."""
  return started_module("multistep_cm.main", *main_args(config, workdir, overrides, *flags),
                        log_path=log_path, **kw)


def free_port() -> int:
  """A free localhost port (for a `jax.distributed` coordinator)."""
  with contextlib.closing(socket.socket(socket.AF_INET, socket.SOCK_STREAM)) as s:
    s.bind(("localhost", 0))
    return s.getsockname()[1]


# --- what runs write -------------------------------------------------------------------------


read_scalars = metric_log.read_scalars


def read_images(logdir):
  """Images `{tag: [(step, uint8 array)]}` from the event files (tensorboard's reader): TF2
  summaries (clu) hold [width, height, png, ...] string tensors, classic ones
  (tensorboardX) image events."""
  import io  # pylint: disable=g-import-not-at-top
  from PIL import Image  # pylint: disable=g-import-not-at-top
  from tensorboard.backend.event_processing import event_accumulator  # pylint: disable=g-import-not-at-top
  from tensorboard.util import tensor_util  # pylint: disable=g-import-not-at-top

  def decode(png):
    return np.asarray(Image.open(io.BytesIO(png)))

  out = {}
  for path in glob.glob(os.path.join(logdir, "events.out.tfevents.*")):
    acc = event_accumulator.EventAccumulator(path, size_guidance={"tensors": 0, "images": 0})
    acc.Reload()
    for tag in acc.Tags()["tensors"]:
      if acc.SummaryMetadata(tag).plugin_data.plugin_name == "images":
        out.setdefault(tag, []).extend(
            (e.step, decode(tensor_util.make_ndarray(e.tensor_proto)[2])) for e in acc.Tensors(tag))
    for tag in acc.Tags()["images"]:
      out.setdefault(tag, []).extend((e.step, decode(e.encoded_image_string))
                                     for e in acc.Images(tag))
  return out


def read_hparams(logdir):
  """The hyperparameters `{dotted.key: value}` TensorBoard's HParams dashboard shows (clu's
  `write_hparams`)."""
  from tensorboard.backend.event_processing import event_accumulator  # pylint: disable=g-import-not-at-top
  from tensorboard.plugins.hparams import plugin_data_pb2  # pylint: disable=g-import-not-at-top
  out = {}
  for path in glob.glob(os.path.join(logdir, "events.out.tfevents.*")):
    acc = event_accumulator.EventAccumulator(path)
    acc.Reload()
    for content in acc.PluginTagToContent("hparams").values():
      info = plugin_data_pb2.HParamsPluginData.FromString(content).session_start_info
      for key, value in info.hparams.items():
        out[key] = getattr(value, value.WhichOneof("kind"))
  return out


def assert_one_line_error(proc, code, *fragments):
  """Exit `code`, an `error: ...` line holding every fragment, and no traceback."""
  assert proc.returncode == code, (proc.returncode, proc.stderr[-3000:])
  assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
  lines = [line for line in proc.stderr.splitlines() if line.startswith("error: ")]
  assert len(lines) == 1, proc.stderr[-3000:]
  for fragment in fragments:
    assert fragment in lines[0], (fragment, lines[0])
  return lines[0]


# --- small data and networks made here -----------------------------------------------------


# One down level: 16x16 RGB -> 8x8x4 latents.
TINY_VAE = dict(block_out_channels=(8, 16), layers_per_block=1, latent_channels=4,
                norm_num_groups=4, in_channels=3, out_channels=3, mid_block_attention=True,
                scaling_factor=0.5)


def write_tiny_vae(path: str, seed: int = 0) -> vae_lib.AutoencoderKL:
  """A converted-VAE file (weights + settings JSON, as `convert --from=sd-vae` writes) of a
  tiny VAE with random weights."""
  module = vae_lib.AutoencoderKL(**TINY_VAE)
  params = nn.meta.unbox(module.init(jax.random.PRNGKey(seed), jnp.zeros((1, 16, 16, 3))))
  flat = {"/".join(k): np.asarray(v) for k, v in
          traverse_util.flatten_dict(params["params"]).items()}
  convert.write(path, flat, {"network": "sd-vae", "settings": TINY_VAE})
  return module


def make_folder(root: str, per_class: int = 12, seed: int = 0):
  """Two class folders ('circles', 'squares') of random 16x16 RGB PNGs."""
  rng = np.random.default_rng(seed)
  for name in ("circles", "squares"):
    os.makedirs(os.path.join(root, name))
    for i in range(per_class):
      Image.fromarray(rng.integers(0, 256, (16, 16, 3), dtype=np.uint8)).save(
          os.path.join(root, name, f"{i:02d}.png"))
