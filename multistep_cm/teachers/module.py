"""A Flax module of your own, in any frame, as a network of ours (docs/maths.md §17).

The trainer, the samplers and the evaluators call a network as
`model.apply({"params": p}, z, logsnr, labels, train=...)` and read a v-prediction in our
frame (models/denoiser.py). `OutsideNetwork` gives a user's module exactly that interface:
it calls the module as `net(z_teacher, time_teacher, labels)` through the adapter
(teachers/adapter.py) and returns `v = alpha epŝ - sigma x̂` of the adapter's `(x̂, epŝ)`,
from which `x_from_v` gives back x̂ (§1.3). Its parameters are the module's, under `net`.
So an outside teacher is distilled, guided and evaluated with no code path of its own, and
a student may be the teacher's own architecture, starting as the teacher.

`load_module(spec)` imports the module a config names: `package.module:name` or
`path/to/file.py:name`, where `name` is a `flax.linen.Module` instance or a function of no
arguments returning one. Its errors are one-line ValueErrors naming what is wrong.
"""
import functools
import importlib
import importlib.util
import inspect
import os
import sys

import flax.linen as nn
import jax.numpy as jnp

from multistep_cm.diffusion import frames
from multistep_cm.diffusion import schedules as schedules_lib
from multistep_cm.teachers import adapter

# A config's flow-time convention (teacher.flow_time) -> the adapter's flip_time.
FLOW_TIMES = {"data_at_0": False, "noise_at_0": True}


class OutsideNetwork(nn.Module):
  """`net`, a teacher in `frame` predicting `prediction`, as a v-predicting network of ours.

  `image_size`/`num_channels` (or `data_dim` for vectors) and `num_classes` describe the data
  it is called on, as our networks' attributes do (models/presets.py: `input_specs`); class
  labels are passed through, the null class being `num_classes` (DiT's convention: a
  module that is guided must read that label as unconditional).
  """
  net: nn.Module
  frame: str = "vp"
  prediction: str = "v"
  time_scale: float = 1.0
  flip_time: bool = False
  schedule_name: str = ""  # a 'vp' module's own schedule (diffusion/schedules.py names)
  schedule_kwargs: tuple[tuple[str, float], ...] = ()
  image_size: int = 0
  num_channels: int = 0
  data_dim: int = 0
  num_classes: int = 0

  def teacher_schedule(self) -> schedules_lib.Schedule | None:
    if not self.schedule_name:
      return None
    return schedules_lib.get_schedule(self.schedule_name, **dict(self.schedule_kwargs))

  def __call__(self, z, logsnr, labels=None, train: bool = False):
    # `train` is our networks' dropout switch (on for the network being trained, with a
    # "dropout" rng; off for a teacher and in sampling). A module whose call takes `train`
    # (EDM's ADM UNet: models/adm.py) is passed it; any other is called as it is.
    net = functools.partial(self.net, train=True) if train and takes_train(self.net) else self.net
    denoise = adapter.adapt_x_eps(net, frame=self.frame, prediction=self.prediction,
                                  time_scale=self.time_scale, flip_time=self.flip_time,
                                  schedule=self.teacher_schedule())
    x, eps = denoise(z, logsnr, labels)
    logsnr = jnp.broadcast_to(jnp.asarray(logsnr, jnp.float32), z.shape[:1])
    return frames.prediction_from_x_eps("v", x, eps, logsnr)


def takes_train(net: nn.Module) -> bool:
  """Whether `net`'s call has a `train` argument (a dropout switch)."""
  try:
    return "train" in inspect.signature(net.__call__).parameters
  except (TypeError, ValueError):  # a call without a signature to read
    return False


def load_module(spec: str) -> nn.Module:
  """The `flax.linen.Module` that `spec` ("package.module:name" or "file.py:name") names.

  Raises:
    ValueError: one line: the spec's form, a module or file that does not import (with the
      import's own error), a missing name, or a name that gives no Flax module.
  """
  where, sep, name = str(spec).rpartition(":")
  if not sep or not where or not name:
    raise ValueError(f"{spec!r} must be 'package.module:name' or 'path/to/file.py:name'")
  try:
    if where.endswith(".py"):
      if not os.path.isfile(where):
        raise ValueError(f"{where!r} is not a file")
      key = f"_multistep_cm_outside_{abs(hash(os.path.abspath(where)))}"
      found = importlib.util.spec_from_file_location(key, where)
      module = importlib.util.module_from_spec(found)
      sys.modules[key] = module
      found.loader.exec_module(module)
    else:
      module = importlib.import_module(where)
  except ValueError:
    raise
  except Exception as e:  # pylint: disable=broad-except
    # Whatever the user's module raises while importing, said in one line.
    first = (str(e).splitlines() or [""])[0]
    raise ValueError(f"{spec!r}: importing {where!r} failed: {type(e).__name__}: "
                     f"{first}") from None
  if not hasattr(module, name):
    raise ValueError(f"{spec!r}: {where!r} has no {name!r}")
  obj = getattr(module, name)
  if not isinstance(obj, nn.Module):
    if not callable(obj):
      raise ValueError(f"{spec!r} is a {type(obj).__name__}, not a flax.linen.Module or a "
                       f"function returning one")
    try:
      obj = obj()  # a function returning the module, or a Module class with defaults
    except Exception as e:  # pylint: disable=broad-except
      first = (str(e).splitlines() or [""])[0]
      raise ValueError(f"{spec!r}: calling it failed: {type(e).__name__}: {first}") from None
    if not isinstance(obj, nn.Module):
      raise ValueError(f"{spec!r} returned a {type(obj).__name__}, not a flax.linen.Module")
  return obj
