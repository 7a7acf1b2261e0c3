"""What a run's config builds: schedule, model, data source, shapes, step counts.

A run's plan (config/plan.py) derives what a config means through this module, once, and
the config checks use the same builders, so each derivation is written once. It imports
the maths, the models and the data sources, and nothing that trains, samples or
evaluates.
"""
import flax.linen as nn
import jax
import numpy as np

from multistep_cm.data import captions
from multistep_cm.data import digits
from multistep_cm.data import image_folder
from multistep_cm.data import latents
from multistep_cm.data import mixture as mixture_lib
from multistep_cm.data import sources
from multistep_cm.data import tfds_source
from multistep_cm.diffusion import losses
from multistep_cm.diffusion import schedules
from multistep_cm.diffusion import segments
from multistep_cm import models
from multistep_cm.teachers import module as teacher_module

# Every dataset a config may name besides 'tfds:<any TFDS name>'.
DATASETS = (("digits", "captioned_digits", "mixture") + tfds_source.TFDS_DATASETS
            + (tfds_source.SYNTHETIC,))


def get_schedule(config) -> schedules.Schedule:
  """The noise schedule, `config.schedule.name` with `config.schedule.kwargs` (§1.2)."""
  return schedules.get_schedule(config.schedule.name, **config.schedule.kwargs.to_dict())


def get_model(config) -> nn.Module:
  """The denoiser: `config.model.preset` with the config's overrides (models/presets.py), or
  with `teacher.student='teacher'` the teacher's own module (`outside_network`)."""
  if config.teacher.student == "teacher":
    return outside_network(config)
  model = models.get_model_for_config(config)
  if config.loss.prediction == "velocity":
    # Our network as a flow-matching one: called at (z_fm, t_fm x VELOCITY_TIME_SCALE),
    # predicting u = eps - x (§17.5).
    return teacher_module.OutsideNetwork(
        net=model, frame="flow", prediction="velocity", time_scale=VELOCITY_TIME_SCALE,
        **_data_dims(config))
  return model


# The flow time t_fm in [0, 1] is passed to our network's logSNR embedding times this: the
# width of the logSNR range the embedding is made for (models/layers.py: logsnr_features).
VELOCITY_TIME_SCALE = 40.0


def _data_dims(config) -> dict[str, int]:
  """The data attributes a network of ours has (models/presets.py: `input_specs`)."""
  shape = example_shape(config)
  dims = ({"data_dim": shape[0]} if len(shape) == 1
          else {"image_size": shape[0], "num_channels": shape[2]})
  return {**dims, "num_classes": int(config.data.num_classes)}


def outside_network(config) -> nn.Module:
  """`config.teacher.module`, in the frame the config gives it, as a network of ours
  (teachers/module.py: `OutsideNetwork`), sized for the config's data.

  Raises:
    ValueError: the module does not import or is not a Flax module (one line).
  """
  t = config.teacher
  return teacher_module.OutsideNetwork(
      net=teacher_module.load_module(t.module), frame=t.frame, prediction=t.prediction,
      time_scale=float(t.time_scale), flip_time=teacher_module.FLOW_TIMES.get(t.flow_time, False),
      schedule_name=t.schedule,
      schedule_kwargs=tuple(sorted(t.schedule_kwargs.to_dict().items())), **_data_dims(config))


def teacher_model(config, model: nn.Module) -> nn.Module:
  """The network the student distils (and samples the ODE error against): the teacher's
  module (`teacher.kind='module'`), else the architecture of our diffusion run that `model`
  starts from (`teacher_architecture`)."""
  if config.teacher.kind == "module":
    return outside_network(config)
  return teacher_architecture(model)


def teacher_architecture(model: nn.Module) -> nn.Module:
  """The diffusion model a student was (or is) initialised from: the student's architecture
  (§7.1) less an any-step student's segment conditioning and a guidance-conditioned
  student's guidance input, which a teacher does not have. A flow-matching network of ours
  (`loss.prediction='velocity'`) has neither, and is its own teacher's architecture."""
  if getattr(model, "segment_cond", "none") != "none":
    model = model.clone(segment_cond="none", num_step_values=0)
  if getattr(model, "guidance_cond", False):
    model = model.clone(guidance_cond=False)
  return model


def guidance_range(config) -> tuple[float, float] | None:
  """`(w_min, w_max)` a guidance-conditioned student trains on (`loss.guidance_range`,
  each example drawing w uniformly from it), or None for one fixed `loss.guidance_scale`."""
  rng = tuple(float(w) for w in config.loss.guidance_range)
  return rng or None


def step_counts(config) -> tuple[int, ...]:
  """The step counts S a student is trained for and samples with: its S, or an any-step
  run's set (`loss.anystep_counts`); () for a diffusion run."""
  if config.loss.mode == "diffusion":
    return ()
  counts = tuple(int(s) for s in config.loss.anystep_counts)
  return counts or (int(config.loss.student_steps),)


def example_shape(config) -> tuple[int, ...]:
  """The shape of one training example: [H, W, C] images, or [D] vectors (the mixture)."""
  if config.data.dataset == "mixture":
    return (int(config.data.data_dim),)
  return (int(config.data.image_size), int(config.data.image_size),
          int(config.data.num_channels))


def data_key(config) -> str:
  """The batch key holding the data: 'x' for the mixture's vectors, else 'image'."""
  return "x" if config.data.dataset == "mixture" else "image"


def make_source(config) -> sources.Source:
  """The training data source of `config.data` (every key present: config/base.py's
  `with_defaults`; the data order is the pipeline's).

  'digits' is embedded, 'captioned_digits' too (with generated captions); 'mixture' is
  `mixture_size` points of the toy mixture drawn once from the config's seed; a TFDS name
  (or 'tfds:<name>') is read from its prepared array_record files, as is 'folder:<name>',
  the user's images prepared as `image_folders/<name>` (data/image_folder.py).

  Raises:
    ValueError: an unknown dataset, naming what is allowed.
    sources.DatasetError: a TFDS dataset that is missing or not prepared (with the
      command that prepares it).
  """
  data = config.data
  dataset, split = data.dataset, data.split
  if dataset == "digits":
    return digits.DigitsSource(split, data.image_size)
  if dataset == "captioned_digits":  # the embedded text-to-image demo (data/captions.py)
    return captions.CaptionedDigitsSource(split, data.image_size, data.partial_captions)
  if dataset == "mixture":
    seed = int(config.seed)
    mix = mixture_lib.default_mixture(dim=int(data.data_dim), seed=seed)
    x, _ = mix.sample(jax.random.PRNGKey(seed + 1), int(data.mixture_size))
    return sources.ArraySource({"x": np.asarray(x)}, num_classes=0)
  folder = image_folder.folder_name(dataset)
  if folder is not None:
    return tfds_source.TfdsSource(f"{image_folder.BUILDER}/{folder}", split, data.data_dir,
                                  data.image_size)
  latent = latents.latent_name(dataset)
  if latent is not None:  # VAE posteriors of an image dataset (data/latents.py)
    return latents.LatentSource(latent, split, data.data_dir)
  if dataset in DATASETS or (isinstance(dataset, str) and dataset.startswith("tfds:")):
    if dataset.removeprefix("tfds:") == tfds_source.SYNTHETIC:
      # Importing it registers its TFDS builder (it imports TensorFlow: only here).
      from multistep_cm.data import synthetic  # pylint: disable=g-import-not-at-top,unused-import
    return tfds_source.TfdsSource(dataset.removeprefix("tfds:"), split, data.data_dir,
                                  data.image_size, data.fast_decode, data.text_len,
                                  data.text_dim)
  raise ValueError(f"config.data.dataset={dataset!r} is not one of {DATASETS}, "
                   f"'tfds:<name>', 'folder:<name>' or 'latent:<name>'")


def class_names(config) -> tuple[str, ...] | None:
  """The names of the data's classes 0 .. num_classes - 1, for sample-grid rows
  (`images.image_grid(..., class_names=)`): a prepared image folder's, from its record (no
  TFDS, no decoding); None for other datasets or one not prepared."""
  folder = image_folder.folder_name(config.data.dataset)
  latent = latents.latent_name(config.data.dataset)
  try:
    if folder is not None:
      return tuple(image_folder.read_record(folder, config.data.data_dir)["class_names"]) or None
    if latent is not None:
      return tuple(latents.read_record(latent, config.data.data_dir)["class_names"]) or None
  except sources.DatasetError:
    return None
  return None


def prompts(config, num: int, seed: int = 0):
  """`(conditioning, captions)`: `num` training examples' text conditioning (models/conditioning.py;
  numpy `text_embedding` [num, L, D], `text_mask` [num, L]) and their caption strings, drawn
  without replacement (with, past the dataset's size) by `seed`: the prompts a text model's
  grids and evaluations sample from. The source must have `captions(indices)`."""
  source = make_source(config)
  rng = np.random.default_rng(seed)
  idx = np.sort(rng.choice(len(source), num, replace=num > len(source)))
  batch = source.get(idx)
  return ({"text_embedding": np.asarray(batch["text_embedding"], np.float32),
           "text_mask": np.asarray(batch["text_mask"], np.int32)}, source.captions(idx))


def segment_boundaries(config, schedule, student_steps: int) -> tuple[float, ...]:
  """The configured boundaries of S segments (`loss.boundaries`, diffusion/segments.py)."""
  kind = config.loss.boundaries
  kind = kind if isinstance(kind, str) else tuple(kind)
  return segments.boundaries(kind, student_steps, schedule)


def trained_boundaries(config, schedule=None) -> dict[str, list[float]]:
  """`{str(S): boundaries}` snapped to the final teacher grid: what sampling must use.

  The trainer stores them in every student checkpoint's metadata, where the sampling
  commands read them back (sampling/runs.py).
  """
  schedule = get_schedule(config) if schedule is None else schedule
  lc = config.loss
  counts = step_counts(config)
  s_max = max(counts)
  num_steps = int(losses.steps_per_segment(lc.teacher_steps_end, s_max)) * s_max
  kind = lc.boundaries if isinstance(lc.boundaries, str) else tuple(lc.boundaries)
  return {str(s): segments.trained_boundaries(kind, s, schedule, num_steps) for s in counts}

