"""Where the trainer's metrics go: TensorBoard event files in the workdir, and the log.

With TensorFlow installed (the `tensorflow-cpu` this package depends on), clu's default
writer: TF2 summaries written asynchronously, plus log lines, as in the Flax examples;
with clu's progress report (steps/s, ETA) and profiler hooks. Without TensorFlow (a GPU
image with JAX alone, where TensorFlow is only needed to read TFDS data), tensorboardX
writes the same tags as classic TensorBoard summaries (scalars, PNG images, the config
as text) and this module reports progress and profiles itself. TensorBoard reads both
(tests/system/test_train.py reads them with TensorBoard's own reader).

Nothing here imports TensorFlow or clu unless it can be imported: `import
multistep_cm.training.loop` works where TensorFlow cannot be.
"""
import glob
import os
import time
from typing import Any, Mapping

from absl import logging
import jax
import numpy as np


def tensorflow_available() -> bool:
  """Whether clu's TensorFlow summary writer can be imported here."""
  try:
    from clu import metric_writers  # pylint: disable=g-import-not-at-top,unused-import
  except ImportError:
    return False
  return True


def create_writer(workdir: str, just_logging: bool = False):
  """The run's metric writer: `write_scalars(step, {tag: value})`, `write_images(step,
  {tag: uint8 [1, H, W, C]})`, `write_hparams({key: value})`, `flush()`, `close()`.

  `just_logging`: log lines only, no event file (processes other than 0).
  """
  if tensorflow_available():
    from clu import metric_writers  # pylint: disable=g-import-not-at-top
    return metric_writers.create_default_writer(workdir, just_logging=just_logging,
                                                asynchronous=True)
  logging.info("TensorFlow is not installed: TensorBoard events are written by tensorboardX.")
  return EventWriter(None if just_logging else workdir)


def progress_hooks(config, workdir: str, start_step: int) -> list:
  """`hook(step)` callables for process 0: progress (steps/s, ETA) in the log every log step
  and, with `config.profile_steps`, a profile of that many steps from step `start_step + 10`.

  The progress goes to the log only: the trainer writes `steps_per_sec` itself (a second
  writer of that tag would give TensorBoard two values per step).
  """
  if tensorflow_available():
    from clu import periodic_actions  # pylint: disable=g-import-not-at-top
    hooks = [periodic_actions.ReportProgress(num_train_steps=config.num_train_steps,
                                             every_steps=config.log_every_steps)]
    if config.profile_steps:
      hooks.append(periodic_actions.Profile(num_profile_steps=config.profile_steps,
                                            logdir=workdir, first_profile=start_step + 10))
    return hooks
  hooks = [Progress(config.num_train_steps, config.log_every_steps, start_step)]
  if config.profile_steps:
    hooks.append(Profile(workdir, start_step + 10, config.profile_steps))
  return hooks


class EventWriter:
  """Scalars, images and hyperparameters to TensorBoard through tensorboardX, and the log."""

  def __init__(self, logdir: str | None):
    self._events = None
    if logdir is not None:
      import tensorboardX  # pylint: disable=g-import-not-at-top
      self._events = tensorboardX.SummaryWriter(logdir, flush_secs=30)

  def write_scalars(self, step: int, scalars: Mapping[str, Any]):
    logging.info("[%d] %s", step, ", ".join(f"{k}={float(v):.6g}"
                                            for k, v in sorted(scalars.items())))
    if self._events is not None:
      for tag, value in scalars.items():
        self._events.add_scalar(tag, float(value), step)

  def write_images(self, step: int, images: Mapping[str, np.ndarray]):
    if self._events is not None:
      for tag, batch in images.items():
        for i, image in enumerate(np.asarray(batch)):
          self._events.add_image(tag if len(batch) == 1 else f"{tag}/{i}", image, step,
                                 dataformats="HWC")

  def write_hparams(self, hparams: Mapping[str, Any]):
    logging.info("[Hyperparameters] %s", dict(hparams))
    if self._events is not None:
      table = "\n".join(f"| {k} | {v} |" for k, v in sorted(hparams.items()))
      self._events.add_text("hparams", "| key | value |\n|---|---|\n" + table, 0)

  def flush(self):
    if self._events is not None:
      self._events.flush()

  def close(self):
    if self._events is not None:
      self._events.close()


class Progress:
  """Logs steps/s and the time left every `every_steps` steps (clu's ReportProgress's role)."""

  def __init__(self, num_train_steps: int, every_steps: int, start_step: int):
    self._total, self._every = num_train_steps, every_steps
    self._last_step, self._last_time = start_step, time.time()

  def __call__(self, step: int):
    if self._every <= 0 or step % self._every:
      return
    now = time.time()
    rate = (step - self._last_step) / max(now - self._last_time, 1e-9)
    self._last_step, self._last_time = step, now
    left = (self._total - step) / rate if rate > 0 else float("inf")
    logging.info("Step %d of %d: %.3g steps/s, %.1f min left.", step, self._total, rate,
                 left / 60)


class Profile:
  """Traces `num_steps` steps from `first_step` with the JAX profiler into `logdir`."""

  def __init__(self, logdir: str, first_step: int, num_steps: int):
    self._logdir, self._first, self._last = logdir, first_step, first_step + num_steps
    self._active = False

  def __call__(self, step: int):
    if step == self._first and not self._active:
      jax.profiler.start_trace(self._logdir)
      self._active = True
    elif step == self._last and self._active:
      jax.profiler.stop_trace()
      self._active = False
      logging.info("Wrote a profile of steps %d to %d to %s.", self._first, self._last,
                   self._logdir)


def read_scalars(workdir):
  """Scalars `{tag: [(step, value)]}` and image tags from a directory's event files
  (TensorBoard's reader: `tensorboard`, which TensorFlow brings, must be installed).

  clu writes TF2 summaries (scalars are 0-d float tensors, images string tensors);
  without TensorFlow, tensorboardX writes classic ones (scalars and images as such). Both
  are read.
  """
  from tensorboard.backend.event_processing import event_accumulator  # pylint: disable=g-import-not-at-top
  from tensorboard.util import tensor_util  # pylint: disable=g-import-not-at-top
  scalars, images = {}, set()
  for path in glob.glob(os.path.join(workdir, "events.out.tfevents.*")):
    acc = event_accumulator.EventAccumulator(
        path, size_guidance={"tensors": 0, "scalars": 0, "images": 0})
    acc.Reload()
    tags = acc.Tags()
    for tag in tags["tensors"]:
      for event in acc.Tensors(tag):
        value = tensor_util.make_ndarray(event.tensor_proto)
        if value.dtype.kind in "fiu" and value.size == 1:
          scalars.setdefault(tag, []).append((event.step, float(value)))
        elif value.dtype.kind in "SO":
          images.add(tag)
    for tag in tags["scalars"]:
      scalars.setdefault(tag, []).extend((e.step, float(e.value)) for e in acc.Scalars(tag))
    images.update(tags["images"])
  return scalars, images
