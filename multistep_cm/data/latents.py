"""Latent datasets: a prepared image dataset encoded once by a VAE, for latent diffusion (DiT, SiT).

  python -m multistep_cm.data.prepare --latents=folder:shapes --vae=sd_vae_ft_ema.safetensors \
      --name=shapes_sd --data_dir=DATA_DIR [--image_size=256] [--batch_size=32]

reads the training split of the image dataset (`folder:NAME`, `tfds:NAME`, an ImageNet name
the trainer knows, or the embedded `digits`, at `--image_size`: default the dataset's own),
encodes every image with the VAE (models/vae.py: the SD VAE `convert --from=sd-vae` writes,
or one `data.train_vae` trained, with its settings JSON beside it), and writes the TFDS
dataset `latents/NAME` (array_record, split 'train') and beside it `RECORD`: the source
dataset and its image shape, the latent shape, the VAE file (its path and SHA-256) and its
scaling factor, the classes. Each example holds the VAE posterior's mean and
standard deviation of one image, both times the scaling factor: the model's space, float32
[S/8, S/8, C] for the SD VAE, and the image's label. Nothing half-written is left (as
data/image_folder.py: a hidden folder renamed into place at the end).

A config names it `data.dataset = 'latent:NAME'`, with `data.image_size` and
`data.num_channels` the latent's (the prepare command prints them; a config that disagrees
is refused before anything compiles). Then:
  - training sees a fresh draw from each example's posterior every time it is read (mean +
    std * N(0, 1), drawn on the device in the train step from a stream of its own,
    training/step.py), as DiT's training encodes `latent_dist.sample()` per batch; the
    horizontal flip is refused (a flipped latent is not the latent of the flipped image);
  - samples are decoded by the record's VAE (`decoder`) wherever they become pictures or are
    scored: the grids, `sample`, `evaluate`, the evaluation during training and the Python
    API; `--vae` of those commands is not needed;
  - the metric is the source dataset's (`pixel_config`), on the decoded images: FID for
    ImageNet, the folder metric (against the folder's held-out split) for `folder:NAME`, the
    digits metric for `digits`.
"""
import dataclasses
import functools
import json
import os
import re
import sys
import time

import ml_collections
import numpy as np

from multistep_cm.data import digits
from multistep_cm.data import image_folder
from multistep_cm.data import tfds_source
from multistep_cm.data.sources import DatasetError
from multistep_cm.data.sources import Source
from multistep_cm.teachers import weights

BUILDER = "latents"
VERSION = "1.0.0"
RECORD = "latents.json"
PREFIX = "latent:"
STD = "image_std"  # the example key of the posterior's standard deviation (model space)


class InputError(ValueError):
  """A latent dataset that cannot be made from what was given: one line."""


def latent_name(dataset) -> str | None:
  """NAME of a config's `'latent:NAME'`, else None."""
  if isinstance(dataset, str) and dataset.startswith(PREFIX) and len(dataset) > len(PREFIX):
    return dataset[len(PREFIX):]
  return None


def dataset_path(name: str, data_dir: str | None) -> str:
  return os.path.join(image_folder.data_dir_or_default(data_dir), BUILDER, name, VERSION)


def prepare_command(name: str, data_dir: str | None) -> str:
  return (f"python -m multistep_cm.data.prepare --latents=DATASET --vae=VAE.safetensors "
          f"--name={name}" + (f" --data_dir={data_dir}" if data_dir else ""))


def read_record(name: str, data_dir: str | None) -> dict:
  """The record `prepare --latents` wrote for `latents/<name>`; DatasetError if not prepared."""
  path = os.path.join(dataset_path(name, data_dir), RECORD)
  try:
    with open(path, encoding="utf-8") as f:
      return json.load(f)
  except FileNotFoundError:
    raise DatasetError(f"latent dataset {name!r} is not prepared in data_dir="
                       f"{image_folder.data_dir_or_default(data_dir)} (no {path}).\nPrepare it "
                       f"once with:\n  {prepare_command(name, data_dir)}") from None
  except (OSError, ValueError) as e:
    raise DatasetError(f"the record {path} of latent dataset {name!r} cannot be read "
                       f"({type(e).__name__}: {e}); prepare it again") from None


def shape_record(record: dict) -> dict:
  """What a config's data keys must match: the latents' shape and the classes."""
  return {"image_size": record["latent_size"], "channels": record["latent_channels"],
          "num_classes": record["num_classes"], "class_names": record["class_names"]}


def config_disagreement(name: str, data_dir: str | None, values: dict) -> str | None:
  """As image_folder.config_disagreement, for `latents/<name>` (its latent shape)."""
  try:
    record = read_record(name, data_dir)
  except DatasetError:
    return None
  return image_folder.record_disagreement(
      shape_record(record), values, f"{PREFIX}{name}",
      os.path.join(dataset_path(name, data_dir), RECORD), "encode the images again to match")


# --- the VAE ---------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Vae:
  """A converted VAE file with its jitted encoder and decoder, its weights on the default
  device (uncommitted: a call may place them with its other arguments)."""
  path: str
  module: object
  params: dict

  @property
  def scaling_factor(self) -> float:
    return float(self.module.scaling_factor)

  @functools.cached_property
  def _encode(self):
    import jax  # pylint: disable=g-import-not-at-top
    import jax.numpy as jnp  # pylint: disable=g-import-not-at-top

    def moments(params, images):
      mean, logvar = self.module.apply({"params": params}, images, method=self.module.moments)
      return mean * self.scaling_factor, jnp.exp(0.5 * logvar) * self.scaling_factor

    return jax.jit(moments)

  @functools.cached_property
  def _decode(self):
    import jax  # pylint: disable=g-import-not-at-top
    return jax.jit(lambda params, z: self.module.apply({"params": params}, z,
                                                       method=self.module.from_model))

  def moments(self, images: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Images [B, H, W, C] in [-1, 1] -> the posterior's (mean, std) in the model's space."""
    mean, std = self._encode(self.params, np.asarray(images, np.float32))
    return np.asarray(mean), np.asarray(std)

  def decode(self, latents):
    """Latents in the model's space [B, h, w, c] -> images [B, 8h, 8w, C] (device arrays)."""
    return self._decode(self.params, latents)


@functools.lru_cache(maxsize=4)
def load_vae(path: str) -> Vae:
  """The VAE `convert --from=sd-vae` wrote at `path` (its settings in the JSON beside it).

  Raises:
    DatasetError: the file or its settings are missing or unreadable (one line).
  """
  from multistep_cm.models import vae as vae_lib  # pylint: disable=g-import-not-at-top
  settings = os.path.splitext(path)[0] + ".json"
  try:
    module = vae_lib.from_settings(settings)
    params = weights.read(path)
  except (OSError, ValueError, weights.WeightsError) as e:
    raise DatasetError(f"the VAE {path} cannot be loaded ({type(e).__name__}: {e}); it is "
                       "what `python -m multistep_cm.convert --from=sd-vae` writes, with its "
                       f"settings {settings} beside it") from None
  import jax  # pylint: disable=g-import-not-at-top
  # On the device once: every call passes them as an argument, not as host constants.
  params = jax.device_put(params.get("params", params))
  return Vae(path, module, params)


def decoder(config):
  """`decode(latents) -> images` of a config on a latent dataset (its record's VAE); None for
  data in pixels."""
  name = latent_name(config.data.dataset)
  if name is None:
    return None
  return load_vae(read_record(name, config.data.data_dir)["vae"]).decode


def pixel_config(config):
  """`config` as seen in pixels: on a latent dataset, a copy whose data are its source's
  (dataset, image size, channels), for metrics and their references; else `config` itself."""
  name = latent_name(config.data.dataset)
  if name is None:
    return config
  record = read_record(name, config.data.data_dir)
  out = ml_collections.ConfigDict(config.to_dict())
  out.data.dataset = record["source"]
  out.data.image_size = record["image_size"]
  out.data.num_channels = record["channels"]
  return out


# --- the dataset -----------------------------------------------------------------------------


class LatentSource(Source):
  """`latents/<name>`'s split read by index: `{'image': posterior mean, STD: its standard
  deviation (both float32 [h, w, c], the model's space), 'label': int32}`."""

  def __init__(self, name: str, split: str = "train", data_dir: str | None = None):
    self.record = read_record(name, data_dir)
    tfds = tfds_source._tfds()  # pylint: disable=protected-access
    self.name, self.split = name, split
    try:
      builder = tfds.core.read_only_builder.builder_from_files(f"{BUILDER}/{name}",
                                                               data_dir=data_dir)
      self._data = builder.as_data_source(split=split)
    except Exception as e:  # pylint: disable=broad-except
      raise DatasetError(f"latent dataset {name!r}, split {split!r}, cannot be opened "
                         f"({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}); "
                         f"prepare it again with:\n  {prepare_command(name, data_dir)}") from e
    self.num_classes = int(self.record["num_classes"])
    self.class_names = tuple(self.record["class_names"]) or None
    self._length = len(self._data)

  def __len__(self) -> int:
    return self._length

  def __getitem__(self, index: int) -> dict[str, np.ndarray]:
    index = int(index)
    if not 0 <= index < self._length:
      raise IndexError(f"{BUILDER}/{self.name} {self.split}: index {index} not in "
                       f"[0, {self._length})")
    record = self._data[index]
    label = (np.int32(record["label"]) if "label" in record else np.int32(self.num_classes))
    return {"image": np.asarray(record["mean"], np.float32),
            STD: np.asarray(record["std"], np.float32), "label": label}


def image_source(dataset: str, data_dir: str | None, image_size: int | None,
                 split: str = "train", flag: str = "--latents"):
  """Split `split` of an image dataset a config could name, at `image_size` (default: its
  own; the embedded digits': 8). The digits' held-out split is 'test', a folder's
  'validation'. Refusals (InputError) name the dataset as `flag`."""
  if dataset == "digits":
    try:
      return digits.DigitsSource(split, image_size or 8)
    except ValueError as e:
      raise InputError(f"{flag}=digits: {e}") from None
  folder = image_folder.folder_name(dataset)
  if folder is not None:
    return tfds_source.TfdsSource(f"{image_folder.BUILDER}/{folder}", split, data_dir,
                                  image_size)
  if dataset in tfds_source.TFDS_DATASETS or dataset.startswith("tfds:"):
    return tfds_source.TfdsSource(dataset.removeprefix("tfds:"), split, data_dir, image_size)
  raise InputError(f"{flag}={dataset}: give a prepared image dataset as a config names it "
                   f"('folder:NAME', 'tfds:NAME' or one of {tfds_source.TFDS_DATASETS}), or "
                   "'digits' (the embedded digits, for a VAE as small as they are: "
                   "`python -m multistep_cm.data.train_vae`)")


@functools.cache
def _builder_class():
  tfds = tfds_source._tfds()  # pylint: disable=protected-access
  version = VERSION

  class Latents(tfds.core.GeneratorBasedBuilder):
    """`latents/NAME`: a dataset's images as VAE posteriors (module docstring)."""

    VERSION = tfds.core.Version(version)
    RELEASE_NOTES = {version: "First version."}

    def __init__(self, *, name, plan, **kwargs):
      self._plan = plan
      super().__init__(config=tfds.core.BuilderConfig(name=name, description=plan.source_name),
                       **kwargs)

    def _info(self):
      shape = self._plan.latent_shape
      features = {"mean": tfds.features.Tensor(shape=shape, dtype=np.float32),
                  "std": tfds.features.Tensor(shape=shape, dtype=np.float32)}
      if self._plan.num_classes:
        features["label"] = tfds.features.ClassLabel(names=self._plan.class_names)
      return tfds.core.DatasetInfo(
          builder=self, description="VAE posteriors of a dataset (multistep_cm/data/latents.py).",
          features=tfds.features.FeaturesDict(features), disable_shuffling=True)

    def _split_generators(self, dl_manager):
      del dl_manager
      return {"train": self._plan.generate()}

    def _generate_examples(self):
      raise NotImplementedError

  return Latents


class _Plan:
  """What `build` writes: every example of `source`, encoded `batch_size` at a time."""

  def __init__(self, source, source_name, vae, batch_size, progress):
    self.source, self.source_name, self.vae = source, source_name, vae
    self.batch_size, self.progress = batch_size, progress
    first = source[0]["image"]
    self.image_size, self.channels = int(first.shape[0]), int(first.shape[-1])
    if self.channels != vae.module.in_channels:
      raise InputError(f"--latents={source_name} has {self.channels}-channel images; the VAE "
                       f"{vae.path} takes {vae.module.in_channels}")
    levels = len(vae.module.block_out_channels) - 1
    if self.image_size % (2 ** levels):
      raise InputError(f"--image_size={self.image_size} must be a multiple of {2 ** levels} (the "
                       f"VAE halves the resolution {levels} times)")
    self.latent_shape = (self.image_size // 2 ** levels, self.image_size // 2 ** levels,
                         int(vae.module.latent_channels))
    self.num_classes = int(source.num_classes)
    self.class_names = list(source.class_names or [str(i) for i in range(self.num_classes)])
    self.written = 0

  def generate(self):
    n = len(self.source)
    start, every = time.monotonic(), max(1, n // self.batch_size // 20)
    for b, lo in enumerate(range(0, n, self.batch_size)):
      batch = self.source.get(range(lo, min(n, lo + self.batch_size)))
      mean, std = self.vae.moments(batch["image"])
      for j in range(mean.shape[0]):
        example = {"mean": mean[j], "std": std[j]}
        if self.num_classes:
          example["label"] = int(batch["label"][j])
        self.written += 1
        yield lo + j, example
      if self.progress and ((b + 1) % every == 0 or lo + self.batch_size >= n):
        print(f"{BUILDER}: {min(n, lo + self.batch_size)}/{n} images encoded "
              f"({time.monotonic() - start:.0f} s)", file=sys.stderr, flush=True)

  def record(self, name: str) -> dict:
    return {"dataset": f"{PREFIX}{name}", "source": self.source_name,
            "image_size": self.image_size, "channels": self.channels,
            "latent_size": self.latent_shape[0], "latent_channels": self.latent_shape[2],
            "vae": os.path.abspath(self.vae.path), "vae_sha256": weights.file_sha256(self.vae.path),
            "scaling_factor": self.vae.scaling_factor, "num_classes": self.num_classes,
            "class_names": self.class_names if self.num_classes else [],
            "splits": {"train": self.written}}


def build(dataset: str, vae_path: str, name: str, data_dir: str | None = None,
          image_size: int | None = None, batch_size: int = 32,
          progress: bool = True) -> tuple[str, dict]:
  """Writes `latents/<name>` into `data_dir` from `dataset`'s training split; returns its
  folder and record.

  Raises:
    InputError: inputs that cannot make it, in one line; nothing is left behind.
    DatasetError: the image dataset is not prepared (with the command that prepares it).
  """
  if not re.fullmatch(r"[a-z0-9_]+", name or ""):
    raise InputError(f"--name={name!r} must be lower-case letters, digits and '_'")
  if batch_size < 1:
    raise InputError(f"--batch_size={batch_size} must be positive")
  final = dataset_path(name, data_dir)
  if os.path.exists(final):
    raise InputError(f"{BUILDER}/{name} is already prepared at {final}; delete that folder "
                     "first, or choose another --name")
  try:
    vae = load_vae(os.path.abspath(vae_path))
  except DatasetError as e:
    raise InputError(f"--vae={vae_path}: {e}") from None
  plan = _Plan(image_source(dataset, data_dir, image_size), dataset, vae, batch_size, progress)
  record = image_folder.write_in_place(lambda where: _builder_class()(
      name=name, plan=plan, data_dir=where, file_format="array_record"),
      lambda: plan.record(name), BUILDER, name, RECORD, data_dir, InputError)
  return final, record
