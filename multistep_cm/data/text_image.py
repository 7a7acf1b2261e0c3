"""Text-image datasets the user prepares from their own files: images, captions, embeddings.

The paper's text-to-image experiment (docs/maths.md §7, Table 6) conditions on a text encoder's
token embeddings. Running a T5-XXL-sized encoder inside the training job costs tens of
GiB and pod time, so the embeddings are computed once, offline, by the user's encoder
and stored beside the images (§15.2). Nothing is downloaded.

  python -m multistep_cm.data.prepare --text_images=MANIFEST --embeddings=EMBEDDINGS \
      --name=NAME --data_dir=DATA_DIR

writes the TFDS dataset `text_images/NAME` (array_record, split 'train') that
`TfdsSource` reads by index (`config.data.dataset = 'tfds:text_images/NAME'`).

Inputs:
  - MANIFEST: a JSON-lines file, one `{"image": PATH, "caption": TEXT}` per line (PATH
    relative to the manifest's folder), or a folder of images each with a caption file of
    the same stem (`0001.jpg` + `0001.txt`), taken in sorted file-name order.
  - EMBEDDINGS: an .npz holding `text_embedding` float [N, L, D] and `text_mask` [N, L]
    (1 = a real token, 0 = padding, tokens first), or a folder holding `text_embedding.npy`
    and `text_mask.npy` (memory-mapped, for datasets larger than memory). Row i belongs to
    the i-th manifest example.

Features of each example:
  - 'image': the image file's bytes as given (any format Pillow reads; decoded and cropped
    by `tfds_source.preprocess_image` when read).
  - 'caption': the caption text, for reports and grids only (never in device batches).
  - 'text_embedding': Tensor [L, D], float32 by default: the encoder's output bitwise.
    `--embedding_dtype=float16` halves the bytes stored and read (1 MiB instead of 2 MiB
    per example at T5-XXL's 128 x 4096) at a relative rounding of at most 2^-11, finer
    than the bfloat16 the model computes in; values beyond float16's range are refused.
    Either way the reader returns float32.
  - 'text_mask': Tensor [L] uint8.
  - no 'label': the reader gives text data the null class (num_classes = 0).
Examples keep the manifest's order (TFDS shuffling disabled), so example i is manifest
row i; the input pipeline shuffles.
"""
import json
import os
import re
import sys
import time

import numpy as np
from PIL import Image
import tensorflow_datasets as tfds

from multistep_cm.data import tfds_source

BUILDER = tfds_source.TEXT_IMAGES
EMBEDDING, MASK, CAPTION = tfds_source.TEXT_EMBEDDING, tfds_source.TEXT_MASK, "caption"
DTYPES = ("float32", "float16")
# Image files a folder manifest takes (Pillow reads them all).
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif")


class InputError(ValueError):
  """The user's manifest or embeddings cannot make a dataset; the message is one line."""


def read_manifest(path: str) -> list[tuple[str, str]]:
  """`[(image path, caption)]` from a JSON-lines manifest or a folder of image + .txt pairs."""
  if os.path.isdir(path):
    return _read_folder(path)
  if not os.path.isfile(path):
    raise InputError(f"--text_images={path}: no such file or folder")
  root, examples = os.path.dirname(os.path.abspath(path)), []
  with open(path, encoding="utf-8") as fh:
    for line_number, line in enumerate(fh, 1):
      if not line.strip():
        continue
      try:
        row = json.loads(line)
        image, caption = row["image"], row["caption"]
      except (ValueError, KeyError, TypeError) as e:
        raise InputError(f"{path} line {line_number}: expected a JSON object with 'image' and "
                         f"'caption' ({type(e).__name__}: {e})") from None
      if not isinstance(image, str) or not isinstance(caption, str):
        raise InputError(f"{path} line {line_number}: 'image' and 'caption' must be strings")
      examples.append((os.path.join(root, image), caption))
  if not examples:
    raise InputError(f"{path} lists no examples")
  return examples


def _read_folder(folder: str) -> list[tuple[str, str]]:
  names = sorted(n for n in os.listdir(folder) if n.lower().endswith(IMAGE_SUFFIXES))
  if not names:
    raise InputError(f"{folder} holds no images ({', '.join(IMAGE_SUFFIXES)})")
  examples = []
  for name in names:
    caption_path = os.path.join(folder, os.path.splitext(name)[0] + ".txt")
    if not os.path.isfile(caption_path):
      raise InputError(f"image {name} in {folder} has no caption file "
                       f"{os.path.basename(caption_path)}")
    with open(caption_path, encoding="utf-8") as fh:
      examples.append((os.path.join(folder, name), fh.read().strip()))
  return examples


def load_embeddings(path: str) -> tuple[np.ndarray, np.ndarray]:
  """`(text_embedding [N, L, D], text_mask [N, L])` from an .npz or a folder of two .npy."""
  if os.path.isdir(path):
    files = {k: os.path.join(path, f"{k}.npy") for k in (EMBEDDING, MASK)}
    present = sorted(f"{k}.npy" for k, f in files.items() if os.path.isfile(f))
    arrays = {k: np.load(f, mmap_mode="r") for k, f in files.items() if os.path.isfile(f)}
  elif os.path.isfile(path):
    try:
      with np.load(path) as npz:
        present = sorted(npz.files)
        arrays = {k: npz[k] for k in (EMBEDDING, MASK) if k in npz.files}
    except (ValueError, OSError) as e:
      raise InputError(f"--embeddings={path} is not an .npz file numpy can read ({e})") from None
  else:
    raise InputError(f"--embeddings={path}: no such file or folder")
  for key in (EMBEDDING, MASK):
    if key not in arrays:
      raise InputError(f"--embeddings={path} has no {key!r} array (it has {present}); save the "
                       f"encoder's output as {EMBEDDING} [N, L, D] and its mask as {MASK} [N, L]")
  return arrays[EMBEDDING], arrays[MASK]


def check_embeddings(embedding: np.ndarray, mask: np.ndarray, num_captions: int):
  """Raises InputError (one line) unless embedding [N, L, D] and mask [N, L] fit N captions.

  The whole mask is checked here, before anything is written; embedding values are
  checked row by row as they are written (`TextImages._generate_examples`).
  """
  if embedding.ndim != 3:
    raise InputError(f"{EMBEDDING} must have rank 3 [N, L, D], got shape {embedding.shape}")
  if not (np.issubdtype(embedding.dtype, np.floating) and embedding.dtype.itemsize >= 2):
    raise InputError(f"{EMBEDDING} must be float16, float32 or float64, got {embedding.dtype}")
  if min(embedding.shape[1:]) < 1:
    raise InputError(f"{EMBEDDING} needs L >= 1 tokens and width D >= 1, got {embedding.shape}")
  if len(embedding) != num_captions:
    raise InputError(f"{EMBEDDING} has {len(embedding)} rows but the manifest has "
                     f"{num_captions} captions; row i must belong to caption i")
  if mask.ndim != 2:
    raise InputError(f"{MASK} must have rank 2 [N, L], got shape {mask.shape}")
  if mask.shape != embedding.shape[:2]:
    raise InputError(f"{MASK} has shape {mask.shape} but {EMBEDDING} has [N, L] = "
                     f"{embedding.shape[:2]}; the mask must match the embedding length")
  mask = np.asarray(mask)
  if not np.all((mask == 0) | (mask == 1)):
    bad = np.argwhere((mask != 0) & (mask != 1))[0]
    raise InputError(f"{MASK} values must be 0 or 1, got {mask[tuple(bad)].item()!r} at row "
                     f"{bad[0]}")
  after_padding = np.any(np.diff(mask.astype(np.int8), axis=1) > 0, axis=1)
  if after_padding.any():
    row = int(np.argmax(after_padding))
    pad = int(np.argmin(mask[row]))
    token = pad + int(np.argmax(mask[row, pad:]))
    raise InputError(f"{MASK} row {row} has tokens after padding (padding at position {pad}, a "
                     f"token at {token}); tokens must come first, then padding (1...1 0...0)")


def _check_row(row: np.ndarray, index: int, dtype: str) -> np.ndarray:
  """One embedding row in the stored dtype, refusing values that do not survive the cast."""
  if not np.all(np.isfinite(row)):
    raise InputError(f"{EMBEDDING} row {index} has non-finite values")
  limit = float(np.finfo(dtype).max)
  if np.abs(row).max() > limit:
    raise InputError(f"{EMBEDDING} row {index} has values beyond {dtype}'s range (|x| <= "
                     f"{limit:g})" + ("; prepare with --embedding_dtype=float32"
                                      if dtype == "float16" else ""))
  return np.asarray(row, dtype)


class TextImages(tfds.core.GeneratorBasedBuilder):
  """`text_images/NAME`: images + captions + precomputed text embeddings (module docstring).

  Only preparing runs this code: a prepared dataset is read back from its files
  (`tfds.builder('text_images/NAME')` finds no such config here and loads what the files
  describe), so the stored dtype and shapes come from the dataset itself.
  """

  VERSION = tfds.core.Version("1.0.0")
  RELEASE_NOTES = {"1.0.0": "First version."}

  def __init__(self, *, name: str, manifest: str, embeddings: str,
               embedding_dtype: str = "float32", channels: int = 3, progress: bool = True,
               **kwargs):
    """Reads and checks the inputs; `download_and_prepare` writes the dataset.

    Args:
      name: the dataset's config name (letters, digits, '_').
      manifest, embeddings: the inputs (module docstring).
      embedding_dtype: 'float32' or 'float16' (module docstring).
      channels: 3 (images read as RGB) or 1 (as grey).
      progress: print a line to stderr every 5% of the examples.
      **kwargs: passed to `tfds.core.GeneratorBasedBuilder` (data_dir, file_format).

    Raises:
      InputError: any input that cannot make the dataset, in one line.
    """
    if not re.fullmatch(r"[a-z0-9_]+", name or ""):
      raise InputError(f"--name={name!r} must be lower-case letters, digits and '_'")
    if embedding_dtype not in DTYPES:
      raise InputError(f"--embedding_dtype={embedding_dtype!r} must be one of {DTYPES}")
    if channels not in (1, 3):
      raise InputError(f"--channels={channels} must be 1 or 3")
    self._examples = read_manifest(manifest)
    self._embedding, self._mask = load_embeddings(embeddings)
    check_embeddings(self._embedding, self._mask, len(self._examples))
    self._dtype, self._channels, self._progress = embedding_dtype, channels, progress
    config = tfds.core.BuilderConfig(name=name, description=f"from {manifest}, {embeddings}")
    super().__init__(config=config, **kwargs)

  def _info(self):
    _, length, width = self._embedding.shape
    return tfds.core.DatasetInfo(
        builder=self,
        description="Images, captions and text embeddings precomputed by the user's encoder.",
        features=tfds.features.FeaturesDict({
            "image": tfds.features.Image(shape=(None, None, self._channels)),
            CAPTION: tfds.features.Text(),
            # Raw bytes: tf.train.Example holds floats only as float32, which would store a
            # float16 embedding at twice its size.
            EMBEDDING: tfds.features.Tensor(shape=(length, width), dtype=np.dtype(self._dtype),
                                            encoding=tfds.features.Encoding.BYTES),
            MASK: tfds.features.Tensor(shape=(length,), dtype=np.uint8),
        }),
        disable_shuffling=True,  # example i is manifest row i
    )

  def _split_generators(self, dl_manager):
    del dl_manager  # nothing to download
    return {"train": self._generate_examples()}

  def _generate_examples(self):
    total, start = len(self._examples), time.monotonic()
    every = max(1, total // 20)
    for i, (path, caption) in enumerate(self._examples):
      yield i, {"image": _image_bytes(path, i), CAPTION: caption,
                EMBEDDING: _check_row(np.asarray(self._embedding[i]), i, self._dtype),
                MASK: np.asarray(self._mask[i], np.uint8)}
      if self._progress and ((i + 1) % every == 0 or i + 1 == total):
        print(f"{BUILDER}/{self.builder_config.name}: {i + 1}/{total} examples read "
              f"({time.monotonic() - start:.0f} s)", file=sys.stderr, flush=True)


def _image_bytes(path: str, index: int) -> bytes:
  """The file's bytes, after Pillow has checked that they are an image it can read."""
  if not os.path.isfile(path):
    raise InputError(f"example {index}: image {path} does not exist")
  try:
    with open(path, "rb") as fh:
      data = fh.read()
    with Image.open(path) as image:
      image.verify()
  except (OSError, SyntaxError, ValueError) as e:
    raise InputError(f"example {index}: {path} is not an image Pillow can read "
                     f"({type(e).__name__}: {e})") from None
  return data


def build(manifest: str, embeddings: str, name: str, data_dir: str | None = None,
          embedding_dtype: str = "float32", channels: int = 3, progress: bool = True,
          file_format: str = "array_record") -> str:
  """Writes `text_images/<name>` into `data_dir`; returns the dataset's folder."""
  tfds_source.ensure_tfds_can_prepare()
  builder = TextImages(name=name, manifest=manifest, embeddings=embeddings,
                       embedding_dtype=embedding_dtype, channels=channels, progress=progress,
                       data_dir=data_dir, file_format=file_format)
  if builder.is_prepared():  # TFDS would keep the old files and ignore the new inputs
    raise InputError(f"{BUILDER}/{name} is already prepared at {builder.data_path}; delete that "
                     "folder first, or choose another --name")
  builder.download_and_prepare()
  return str(builder.data_path)
