"""TFDS image datasets read by index: ImageNet 2012 and its downsampled variants.

`TfdsSource` opens a prepared TFDS dataset through its array_record files
(`builder.as_data_source`), so example `i` can be read without reading the ones
before it: this is what lets every process read only its own examples, and a
resumed run start at any step.

Preprocessing (`preprocess_image`), identical for every dataset:
  1. Decode the stored JPEG/PNG bytes with Pillow and convert to RGB (or L for
     one-channel datasets).
  2. Take the central square whose side is the shorter image side, at its exact
     (possibly half-pixel) centre.
  3. Resize that square to `image_size` x `image_size` with Pillow's bicubic
     filter, which is antialiased: its support widens with the downscaling factor,
     so every source pixel contributes. Skipped when the crop already has the
     target size (the downsampled variants at their native size).
  4. uint8 -> float32 in [-1, 1] by `x / 127.5 - 1`.
ADM's `center_crop_arr` (box-halving, bicubic resize of the shorter side, then an
integer crop) selects the same region up to half an output pixel and filters a
little differently.

With `fast_decode=True` a JPEG is decoded by libjpeg at a reduced DCT scale (1/2,
1/4 or 1/8) chosen so that the crop keeps at least 2x the target resolution,
which then goes through step 3 as before. The crop geometry is unchanged; the
first reduction becomes libjpeg's DCT-domain filter instead of the bicubic one,
much like ADM's box-halving. It only helps when the shorter side is >= 4x the
target (e.g. 64 px from typical ImageNet photos); see benchmarks/input_pipeline.py.

TensorFlow Datasets (and with it TensorFlow) is imported only when a dataset is opened or
prepared (`_tfds`), so the trainer starts where TensorFlow is not installed and reads
the embedded data there.
"""
import importlib.resources.abc
import io
import re
import sys

import numpy as np
from PIL import Image
from multistep_cm.data.sources import DatasetError
from multistep_cm.data.sources import Source

# TFDS names a config may give as data.dataset (all in tensorflow-datasets 4.9.10); any
# other as 'tfds:<name>'. `downsampled_imagenet` (van den Oord et al. 2016) has no labels;
# `imagenet_resized` (Chrabaszcz et al. 2017, box-resized whole images) has them.
TFDS_DATASETS = (
    "imagenet2012",
    "downsampled_imagenet/32x32", "downsampled_imagenet/64x64",
    "imagenet_resized/8x8", "imagenet_resized/16x16", "imagenet_resized/32x32",
    "imagenet_resized/64x64",
)

# The ImageNet-shaped dataset data/synthetic.py writes for tests and benchmarks.
SYNTHETIC = "synthetic_jpeg"

# Text-image datasets the user prepares (data/text_image.py): `text_images/<name>`, whose
# examples carry the encoder's token embeddings [L, D] and mask [L] beside the image.
TEXT_IMAGES = "text_images"
TEXT_EMBEDDING, TEXT_MASK = "text_embedding", "text_mask"

# Image datasets the user prepares from a folder or zip of images (data/image_folder.py):
# `image_folders/<name>`, which a config names as 'folder:<name>'.
IMAGE_FOLDERS = "image_folders"
# What only their own files describe (no registered TFDS builder).
USER_DATASETS = (TEXT_IMAGES, IMAGE_FOLDERS)

# The manual-download archives `tfds build imagenet2012` looks for in manual_dir.
IMAGENET_ARCHIVES = ("ILSVRC2012_img_train.tar", "ILSVRC2012_img_val.tar")


def decode_center_square(data: bytes, channels: int = 3, min_size: int | None = None):
  """Decodes JPEG/PNG bytes and locates the central square of the shorter side.

  Args:
    data: the encoded image.
    channels: 3 (converted to RGB) or 1 (converted to L).
    min_size: if given and the image is a JPEG, let libjpeg decode at the coarsest
      DCT scale (1, 1/2, 1/4, 1/8) that keeps the shorter side >= `min_size`.

  Returns:
    `(image, box)`: the decoded Pillow image and the crop box (left, top, right,
    bottom) in its pixel coordinates, possibly fractional, of the central square.

  Raises:
    OSError or ValueError (Pillow's errors) when the bytes are not a valid image.
  """
  image = Image.open(io.BytesIO(data))
  width, height = image.size
  scale = 1.0
  if min_size is not None and image.format == "JPEG":
    # Pillow reduces by the largest of 8, 4, 2, 1 not above min(W, H) // min_size.
    drafted = image.draft(None, (min_size, min_size))
    if drafted is not None:
      scale = width / drafted[1][2]  # the full image spans (0, 0, W / scale, H / scale)
  image = image.convert("RGB" if channels == 3 else "L")
  side = min(width, height)
  left, top = (width - side) / 2, (height - side) / 2
  box = tuple(v / scale for v in (left, top, left + side, top + side))
  return image, box


def preprocess_image(data: bytes, image_size: int, channels: int = 3,
                     fast_decode: bool = False) -> np.ndarray:
  """Encoded bytes -> float32 [S, S, C] in [-1, 1]; the method is in the module docstring."""
  image, box = decode_center_square(data, channels, 2 * image_size if fast_decode else None)
  if image.size != (image_size, image_size) or box != (0, 0, image_size, image_size):
    image = image.resize((image_size, image_size), Image.Resampling.BICUBIC, box=box)
  array = np.asarray(image, np.uint8)
  if array.ndim == 2:
    array = array[..., None]
  return array.astype(np.float32) / 127.5 - 1.0


def _tfds():
  """The `tensorflow_datasets` module, imported on first use (it imports TensorFlow)."""
  import tensorflow_datasets  # pylint: disable=g-import-not-at-top
  return tensorflow_datasets


def ensure_tfds_can_prepare():
  """Works around tensorflow/datasets#11212 (open in tfds 4.9.10).

  `DatasetBuilder.code_path` imports the `importlib_resources` backport, which
  tfds declares only for Python < 3.9, so every `download_and_prepare` of a
  builder that lives in a package fails with ModuleNotFoundError on 3.11. The
  standard library's `importlib.resources` (with `.abc` since 3.11) has what it
  uses; the backport wins where it is installed.
  """
  sys.modules.setdefault("importlib_resources", importlib.resources)


def prepare_command(name: str, data_dir: str | None) -> str:
  """The shell command that prepares TFDS dataset `name` for random access."""
  builder, _, config = name.partition("/")
  if builder == TEXT_IMAGES:  # made from the user's files, not by TFDS
    command = ("python -m multistep_cm.data.prepare --text_images=MANIFEST "
               f"--embeddings=EMBEDDINGS --name={config or 'NAME'}")
    return command + (f" --data_dir={data_dir}" if data_dir is not None else "")
  if builder == IMAGE_FOLDERS:
    command = f"python -m multistep_cm.data.prepare --images=DIR_OR_ZIP --name={config or 'NAME'}"
    return command + (f" --data_dir={data_dir}" if data_dir is not None else "")
  command = f"python -m multistep_cm.data.prepare --dataset={name}"
  if data_dir is not None:
    command += f" --data_dir={data_dir}"
  if _needs_manual_download(name):
    command += " --manual_dir=MANUAL_DIR"
  return command


def _needs_manual_download(name: str) -> bool:
  try:
    return bool(_tfds().builder_cls(name.split("/")[0].split(":")[0]).MANUAL_DOWNLOAD_INSTRUCTIONS)
  except Exception:  # pylint: disable=broad-except
    return False  # unknown names are reported by `tfds.builder` itself


def _how_to_prepare(name: str, data_dir: str | None) -> str:
  """Instructions that end every 'not prepared' message."""
  lines = [f"Prepare it once with:\n  {prepare_command(name, data_dir)}"]
  if name.startswith(TEXT_IMAGES + "/"):
    return lines[0] + "\n(multistep_cm/data/text_image.py describes MANIFEST and EMBEDDINGS)"
  if name.startswith(IMAGE_FOLDERS + "/"):
    return lines[0] + "\n(docs/data.md, 'Your own images', describes the folder layouts)"
  manual = ""
  if _needs_manual_download(name):
    manual = " --manual_dir=MANUAL_DIR"
    archives = " and ".join(IMAGENET_ARCHIVES) if name.startswith("imagenet2012") else "its files"
    lines.append(f"{name} needs a manual download first: put {archives} (from "
                 "https://image-net.org/download-images, registration needed) into MANUAL_DIR "
                 "(TFDS's default is <data_dir>/downloads/manual).")
  lines.append(f"(or `tfds build {name} --data_dir={data_dir}{manual} --file_format=array_record`"
               ", where apache-beam is installed: tfds 4.9.10's CLI needs it to start)")
  return "\n".join(lines)


class TfdsSource(Source):
  """A prepared TFDS image dataset, read by index from its array_record files.

  Examples are `{'image': float32 [S, S, C] in [-1, 1], 'label': int32}` (see the
  module docstring for the preprocessing). Datasets without a `'label'` feature
  (e.g. `downsampled_imagenet`, text-image data) get the null class, `num_classes` = 0;
  `class_names` are the label feature's names (None without one).
  Opened with `text_dim > 0`, a text-image dataset's examples also hold
  `'text_embedding'` float32 [L, D] and `'text_mask'` int32 [L] (1 = token, 0 = padding);
  its captions are read apart, by `captions`.
  """

  def __init__(self, name: str, split: str = "train", data_dir: str | None = None,
               image_size: int | None = None, fast_decode: bool = False,
               text_len: int = 0, text_dim: int = 0):
    """Opens split `split` of `name` in `data_dir` (TFDS's default when None).

    Args:
      name: TFDS name with config, e.g. 'imagenet2012' or 'imagenet_resized/64x64'.
      split: a TFDS split, slices allowed ('train', 'validation', 'train[:1%]').
      data_dir: the TFDS data directory the dataset was prepared into.
      image_size: output side; None keeps the native size of fixed-size datasets.
      fast_decode: decode JPEGs at a reduced DCT scale (module docstring).
      text_len, text_dim: the token count L and width D the model expects
        (config.data.text_len / text_dim); text_dim = 0 reads no text.

    Raises:
      DatasetError: the dataset is unknown, not prepared, not in array_record
        format, or has no split `split`; or, for text_dim > 0, it has no text
        embeddings, or not of shape [text_len, text_dim], or no mask of length
        text_len. The message says how to fix it.
    """
    tfds = _tfds()
    self.name, self.split, self.fast_decode = name, split, fast_decode
    where = f"in data_dir={data_dir}" if data_dir else "in TFDS's default data_dir"
    try:
      if name.split("/")[0] in USER_DATASETS:
        # Made from the user's files: only the files describe it (data/text_image.py,
        # data/image_folder.py).
        builder = tfds.core.read_only_builder.builder_from_files(name, data_dir=data_dir)
      else:
        builder = tfds.builder(name, data_dir=data_dir)
    except tfds.core.DatasetNotFoundError as e:
      if name.split("/")[0] in USER_DATASETS:
        raise DatasetError(f"TFDS dataset {name!r} is not prepared {where}.\n"
                           f"{_how_to_prepare(name, data_dir)}") from e
      raise DatasetError(f"TFDS has no dataset named {name!r} (tensorflow-datasets "
                         f"{tfds.__version__}).") from e
    features = builder.info.features
    if "image" not in features:
      raise DatasetError(f"TFDS dataset {name!r} has no 'image' feature "
                         f"(it has {sorted(features)}), so it cannot feed an image model.")
    self.text_len, self.text_dim = (int(text_len), int(text_dim)) if text_dim else (0, 0)
    if self.text_dim:
      _check_text_features(features, name, self.text_len, self.text_dim, data_dir)
    try:
      self._data = builder.as_data_source(split=split,
                                          decoders={"image": tfds.decode.SkipDecoding()})
    except Exception as e:  # pylint: disable=broad-except
      raise _open_error(builder, name, split, data_dir, where, e) from e

    shape = features["image"].shape
    self.channels = shape[-1] or 3
    self.image_size = image_size or _native_size(builder, shape)
    label = features["label"] if "label" in features else None
    self._has_label = isinstance(label, tfds.features.ClassLabel)
    self.num_classes = label.num_classes if self._has_label else 0
    self.class_names = tuple(label.names) if self._has_label else None
    self._has_caption = "caption" in features
    self._length = len(self._data)

  def __len__(self) -> int:
    return self._length

  def __getitem__(self, index: int) -> dict[str, np.ndarray]:
    index = int(index)
    if not 0 <= index < self._length:
      raise IndexError(f"{self.name} {self.split}: index {index} not in [0, {self._length})")
    try:
      record = self._data[index]
      image = preprocess_image(record["image"], self.image_size, self.channels, self.fast_decode)
    except Exception as e:  # pylint: disable=broad-except
      raise DatasetError(
          f"Corrupted record: TFDS dataset {self.name!r}, split {self.split!r}, example index "
          f"{index} could not be read and decoded ({type(e).__name__}: {e}). Prepare the "
          f"dataset again, or check the files under its data_dir.") from e
    label = np.int32(record["label"]) if self._has_label else np.int32(self.num_classes)
    example = {"image": image, "label": label}
    if self.text_dim:  # float16 -> float32 is exact; the mask is 0/1
      example[TEXT_EMBEDDING] = np.asarray(record[TEXT_EMBEDDING], np.float32)
      example[TEXT_MASK] = np.asarray(record[TEXT_MASK], np.int32)
    return example

  def captions(self, indices) -> list[str]:
    """The caption strings of examples `indices`, for reports and sample grids."""
    if not self._has_caption:
      raise DatasetError(f"TFDS dataset {self.name!r} has no 'caption' feature.")
    return [_as_text(self._data[int(i)]["caption"]) for i in np.ravel(indices)]


def _as_text(value) -> str:
  return value.decode("utf-8") if isinstance(value, bytes) else str(value)


def _check_text_features(features, name, text_len, text_dim, data_dir):
  """Raises DatasetError (one line) unless the dataset has the text a [L, D] model reads."""
  command = prepare_command(name if name.startswith(TEXT_IMAGES + "/") else
                            f"{TEXT_IMAGES}/NAME", data_dir)
  if text_len < 1:
    raise DatasetError(f"config.data.text_len must be >= 1 for text data (text_dim={text_dim}), "
                       f"got {text_len}")
  if TEXT_EMBEDDING not in features:
    raise DatasetError(f"TFDS dataset {name!r} has no {TEXT_EMBEDDING} feature (it has "
                       f"{sorted(features)}), but config.data.text_dim={text_dim} asks for text "
                       f"embeddings; prepare it with {command}")
  shape = tuple(features[TEXT_EMBEDDING].shape)
  if len(shape) != 2:
    raise DatasetError(f"TFDS dataset {name!r} has {TEXT_EMBEDDING} of shape {shape}, not "
                       f"[L, D]; prepare it with {command}")
  length, width = shape
  if width != text_dim:
    raise DatasetError(f"TFDS dataset {name!r} has text embeddings of width D={width}, but "
                       f"config.data.text_dim={text_dim}; set text_dim={width} or prepare the "
                       f"dataset from an encoder of width {text_dim}")
  if length != text_len:
    raise DatasetError(f"TFDS dataset {name!r} has text embeddings of length L={length}, but "
                       f"config.data.text_len={text_len}; set text_len={length} or prepare the "
                       f"dataset with {text_len} tokens per caption")
  if TEXT_MASK not in features:
    raise DatasetError(f"TFDS dataset {name!r} has {TEXT_EMBEDDING} but no {TEXT_MASK} "
                       f"feature, so padding cannot be told from tokens; prepare it with {command}")
  if tuple(features[TEXT_MASK].shape) != (length,):
    raise DatasetError(f"TFDS dataset {name!r} has a {TEXT_MASK} of shape "
                       f"{tuple(features[TEXT_MASK].shape)}, which does not match its "
                       f"{TEXT_EMBEDDING} length L={length}; prepare it with {command}")


def _native_size(builder, shape) -> int:
  """The side of a dataset of square images of one size (its shape, else its config name)."""
  if shape[0] is not None and shape[0] == shape[1]:
    return shape[0]
  config = builder.builder_config.name if builder.builder_config else ""
  match = re.fullmatch(r"(\d+)x\1", config)  # downsampled_imagenet/64x64 declares no shape
  if match:
    return int(match.group(1))
  raise ValueError(f"image_size is required for {builder.name!r}, whose images have shape {shape}")


def _open_error(builder, name, split, data_dir, where, error) -> DatasetError:
  """Explains why `builder.as_data_source` failed, with the command that fixes it."""
  data_dir = data_dir or str(builder.data_dir_root)
  if not builder.is_prepared():
    return DatasetError(f"TFDS dataset {name!r} is not prepared {where} (nothing valid at "
                        f"{builder.data_path}).\n{_how_to_prepare(name, data_dir)}")
  formats = builder.info.available_file_formats()
  if _tfds().core.FileFormat.ARRAY_RECORD not in formats:
    found = ", ".join(sorted(f.value for f in formats)) or "unknown"
    return DatasetError(
        f"TFDS dataset {name!r} is prepared {where} as {found}, but the input pipeline reads "
        f"examples by index, which needs the array_record format. Prepare it again into another "
        f"data_dir (or delete {builder.data_path} first).\n{_how_to_prepare(name, data_dir)}")
  splits = sorted(builder.info.splits)
  if split.split("[")[0] not in splits:
    return DatasetError(f"TFDS dataset {name!r} has no split {split!r}; it has {splits}.")
  return DatasetError(f"TFDS dataset {name!r} split {split!r} {where} could not be opened "
                      f"({type(error).__name__}: {error}).")
