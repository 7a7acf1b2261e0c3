"""Image datasets made from the user's own files: a folder, class subfolders, or an EDM zip.

  python -m multistep_cm.data.prepare --images=DIR_OR_ZIP --name=NAME --data_dir=DATA_DIR \
      [--image_size=N] [--crop=center|none] [--holdout=0.1|COUNT] [--skip_bad]

writes the TFDS dataset `image_folders/NAME` (array_record; split 'train', and 'validation'
for the held-out examples) that `TfdsSource` reads by index, and beside it `RECORD`, what
the dataset is (size, channels, classes and their names, splits, skipped files), which a
config naming `data.dataset = 'folder:NAME'` is checked against before anything compiles.

Layouts (a folder, or the same inside a .zip):
  - `dataset.json` at the top (EDM's `dataset_tool` layout): every image below it, sorted by
    its '/'-separated path, labelled by `{"labels": [[path, class id], ...]}`; `"labels":
    null` is unlabelled. Classes are named by their ids ('0', '1', ...).
  - images directly in it: unlabelled, in sorted file-name order.
  - two or more subfolders holding images: one class per subfolder, named by it, class ids
    in sorted name order, images anywhere below their class folder. A single subfolder is
    read as one unlabelled set.
Files whose names do not end in `IMAGE_SUFFIXES` are ignored (and counted).

Every image is decoded once, here (Pillow; PNG, JPEG or WebP, grey or colour), converted
to grey if every image is grey, else to RGB (`--channels` forces either), cropped to its
central square (`--crop=center`; `none` refuses non-square images), resized with
antialiased bicubic filtering to `--image_size` (default: the images' own size, which
must then be one) and stored as PNG, so reading it back is lossless and needs no resize.
A file Pillow cannot read, or that is truncated, is refused in one line naming it, or with
`--skip_bad` left out and counted. The held-out examples are a fixed pseudo-random choice
(seed 0); both splits keep the layout's order.

Nothing half-written is left: TFDS writes into a hidden folder beside the dataset, which
is renamed into place (one atomic rename) only once every example and the record are
written, and removed if preparing fails or is interrupted.
"""
import dataclasses
import functools
import io
import json
import os
import re
import shutil
import sys
import time
import uuid
import zipfile

import numpy as np
from PIL import Image
from PIL import UnidentifiedImageError

from multistep_cm.data import tfds_source
from multistep_cm.data.sources import DatasetError

BUILDER = tfds_source.IMAGE_FOLDERS
VERSION = "1.0.0"
RECORD = "image_folder.json"
EDM_LABELS = "dataset.json"
HOLDOUT_SPLIT = "validation"
CROPS = ("center", "none")
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp")
# Pillow modes without colour; anything else is converted to RGB.
_GREY_MODES = ("1", "L", "LA", "La", "I", "I;16", "I;16B", "I;16L", "F")
# What Pillow raises for bytes that are not a whole image (truncation is an OSError).
_BAD_IMAGE = (OSError, SyntaxError, ValueError, UnidentifiedImageError,
              Image.DecompressionBombError)


class InputError(ValueError):
  """The user's images cannot make a dataset; the message is one line."""


# --- what the input holds ----------------------------------------------------------------------


class _Files:
  """The files of a folder or a zip, by '/'-separated relative name."""

  def __init__(self, path: str):
    self.path = path
    if os.path.isdir(path):
      self._zip = None
      names = []
      for root, dirs, files in os.walk(path):
        dirs.sort()
        rel = os.path.relpath(root, path)
        names += [f if rel == "." else f"{rel}/{f}".replace(os.sep, "/") for f in files]
      self.names = sorted(names)
    elif os.path.isfile(path):
      try:
        self._zip = zipfile.ZipFile(path)
      except (zipfile.BadZipFile, OSError) as e:
        raise InputError(f"--images={path} is neither a folder nor a zip file "
                         f"({type(e).__name__}: {e})") from None
      self.names = sorted(n for n in self._zip.namelist() if not n.endswith("/"))
    else:
      raise InputError(f"--images={path}: no such folder or zip file")

  def read(self, name: str) -> bytes:
    if self._zip is not None:
      return self._zip.read(name)
    with open(os.path.join(self.path, *name.split("/")), "rb") as fh:
      return fh.read()

  def close(self):
    if self._zip is not None:
      self._zip.close()


@dataclasses.dataclass(frozen=True)
class Listing:
  """The examples a layout gives: image file names, their class ids (None: unlabelled)."""
  layout: str  # 'edm', 'flat' or 'classes'
  files: tuple[str, ...]
  labels: tuple[int, ...] | None
  class_names: tuple[str, ...]
  ignored: int  # files that are not images by their suffix


def _is_image(name: str) -> bool:
  return name.lower().endswith(IMAGE_SUFFIXES) and not name.split("/")[-1].startswith(".")


def list_examples(files: _Files) -> Listing:
  """The layout of `files` (module docstring) and its examples; InputError if it has none."""
  images = [n for n in files.names if _is_image(n)]
  ignored = len([n for n in files.names if not _is_image(n) and n != EDM_LABELS])
  where = f"--images={files.path}"
  if not images:
    raise InputError(f"{where} holds no images ({', '.join(IMAGE_SUFFIXES)})")
  if EDM_LABELS in files.names:
    labels = _edm_labels(files, images)
    num = max(labels) + 1 if labels else 0
    return Listing("edm", tuple(images), labels, tuple(str(i) for i in range(num)), ignored)
  top = sorted({n.split("/")[0] for n in images if "/" in n})
  at_top = [n for n in images if "/" not in n]
  if at_top and top:
    raise InputError(f"{where} holds images both at its top ({at_top[0]}) and in subfolders "
                     f"({top[0]}/); put every image in a class subfolder, or all at the top")
  if len(top) < 2:
    return Listing("flat", tuple(images), None, (), ignored)
  labels = tuple(top.index(n.split("/")[0]) for n in images)
  return Listing("classes", tuple(images), labels, tuple(top), ignored)


def _edm_labels(files: _Files, images: list[str]) -> tuple[int, ...] | None:
  """Class ids of `images` from an EDM `dataset.json`; None where its labels are null."""
  where = f"{files.path}: {EDM_LABELS}"
  try:
    meta = json.loads(files.read(EDM_LABELS).decode("utf-8"))
    rows = meta["labels"]
  except (ValueError, KeyError, TypeError, UnicodeDecodeError) as e:
    raise InputError(f"{where} must be a JSON object with 'labels': [[file, class], ...] or "
                     f"null ({type(e).__name__}: {e})") from None
  if rows is None:
    return None
  if not isinstance(rows, list):
    raise InputError(f"{where}: 'labels' must be a list of [file, class] or null, got "
                     f"{type(rows).__name__}")
  table = {}
  for row in rows:
    ok = (isinstance(row, list) and len(row) == 2 and isinstance(row[0], str)
          and isinstance(row[1], int) and not isinstance(row[1], bool) and row[1] >= 0)
    if not ok:
      raise InputError(f"{where}: every label must be [file, class id >= 0] (one integer "
                       f"class per image), got {json.dumps(row)[:80]}")
    table[row[0].replace("\\", "/")] = row[1]
  missing = [n for n in images if n not in table]
  if missing:
    raise InputError(f"{where} has no label for {missing[0]} ({len(missing)} of "
                     f"{len(images)} images unlabelled)")
  return tuple(table[n] for n in images)


# --- pixels ------------------------------------------------------------------------------------


def _open(data: bytes, name: str, load: bool) -> Image.Image:
  """The image in `data` (fully decoded where `load`); InputError naming `name` if bad."""
  try:
    image = Image.open(io.BytesIO(data))
    if load:
      image.load()
    return image
  except UnidentifiedImageError:
    raise InputError(f"{name} is not an image Pillow can read (not a PNG, JPEG or WebP it "
                     "recognises)") from None
  except _BAD_IMAGE as e:
    raise InputError(f"{name} is not an image Pillow can read ({type(e).__name__}: "
                     f"{str(e).splitlines()[0] if str(e) else 'no detail'})") from None


def _side(image: Image.Image, name: str, crop: str) -> int:
  width, height = image.size
  if crop == "none" and width != height:
    raise InputError(f"{name} is {width}x{height}, not square; prepare with --crop=center "
                     "(its central square) or make the images square")
  return min(width, height)


def to_pixels(image: Image.Image, channels: int, image_size: int, crop: str) -> np.ndarray:
  """uint8 [S, S, C]: the central square (integer crop at the native size, else the exact
  centre resized with antialiased bicubic, as `tfds_source.preprocess_image` does)."""
  if image.mode in ("P", "PA") or "transparency" in image.info:
    image = image.convert("RGBA")  # palette and transparency: colours as they look
  image = image.convert("RGB" if channels == 3 else "L")
  width, height = image.size
  side = min(width, height)
  if side == image_size:
    left, top = (width - side) // 2, (height - side) // 2
    image = image.crop((left, top, left + side, top + side))
  else:
    box = ((width - side) / 2, (height - side) / 2, (width + side) / 2, (height + side) / 2)
    if crop == "none":
      box = (0, 0, width, height)
    image = image.resize((image_size, image_size), Image.Resampling.BICUBIC, box=box)
  array = np.asarray(image, np.uint8)
  return array[..., None] if array.ndim == 2 else array


def _png(pixels: np.ndarray) -> bytes:
  out = io.BytesIO()
  Image.fromarray(pixels[..., 0] if pixels.shape[-1] == 1 else pixels).save(out, format="PNG")
  return out.getvalue()


# --- the dataset -------------------------------------------------------------------------------


def holdout_count(holdout: str | float | int | None, total: int) -> int:
  """Examples held out: a fraction in (0, 1), or a count; at least one must stay to train."""
  if holdout is None or holdout == "":
    return 0
  try:
    value = float(holdout)
  except (TypeError, ValueError):
    value = -1.0  # refused below
  if value == 0:
    return 0
  if 0 < value < 1:
    count = max(1, int(round(value * total)))
  elif 1 <= value <= sys.maxsize and value == int(value):
    count = int(value)
  else:
    raise InputError(f"--holdout={holdout} must be a fraction in (0, 1) or a whole number "
                     "of images")
  if count >= total:
    raise InputError(f"--holdout={holdout} holds out {count} of the {total} images; at least "
                     "one must stay in 'train'")
  return count


def data_dir_or_default(data_dir: str | None) -> str:
  """TFDS's data directory: `data_dir`, else $TFDS_DATA_DIR, else ~/tensorflow_datasets."""
  return data_dir or os.environ.get("TFDS_DATA_DIR") or os.path.expanduser(
      "~/tensorflow_datasets")


def dataset_path(name: str, data_dir: str | None) -> str:
  """Where `image_folders/<name>` lives once prepared."""
  return os.path.join(data_dir_or_default(data_dir), BUILDER, name, VERSION)


def folder_name(dataset: str) -> str | None:
  """NAME of a config's `'folder:NAME'` or `'tfds:image_folders/NAME'`, else None."""
  if not isinstance(dataset, str):
    return None
  for prefix in ("folder:", f"tfds:{BUILDER}/"):
    if dataset.startswith(prefix):
      return dataset[len(prefix):]
  return None


def read_record(name: str, data_dir: str | None) -> dict:
  """The record `prepare` wrote for `image_folders/<name>`; DatasetError if not prepared."""
  from etils import epath  # pylint: disable=g-import-not-at-top
  path = epath.Path(dataset_path(name, data_dir)) / RECORD
  try:
    return json.loads(path.read_text())
  except FileNotFoundError:
    raise DatasetError(f"image folder dataset {name!r} is not prepared in data_dir="
                       f"{data_dir_or_default(data_dir)} (no {path}).\nPrepare it once with:\n"
                       f"  {tfds_source.prepare_command(f'{BUILDER}/{name}', data_dir)}"
                       ) from None
  except (OSError, ValueError) as e:
    raise DatasetError(f"the record {path} of image folder dataset {name!r} cannot be read "
                       f"({type(e).__name__}: {e}); prepare it again") from None


@functools.cache
def _builder_class():
  """The TFDS builder, defined on first use: TFDS (and TensorFlow) load only to prepare."""
  tfds = tfds_source._tfds()  # pylint: disable=protected-access
  version = VERSION  # the class body's own VERSION hides the module's

  class ImageFolders(tfds.core.GeneratorBasedBuilder):
    """`image_folders/NAME`: the user's images (module docstring). Only preparing runs this
    code; a prepared dataset is read back from what its files describe."""

    VERSION = tfds.core.Version(version)
    RELEASE_NOTES = {version: "First version."}

    def __init__(self, *, name, plan, **kwargs):
      self._plan = plan
      config = tfds.core.BuilderConfig(name=name, description=f"from {plan.files.path}")
      super().__init__(config=config, **kwargs)

    def _info(self):
      plan = self._plan
      features = {"image": tfds.features.Image(
                      shape=(plan.image_size, plan.image_size, plan.channels),
                      encoding_format="png"),
                  "file": tfds.features.Text()}
      if plan.listing.labels is not None:
        features["label"] = tfds.features.ClassLabel(names=plan.listing.class_names)
      return tfds.core.DatasetInfo(
          builder=self, description="The user's images (multistep_cm/data/image_folder.py).",
          features=tfds.features.FeaturesDict(features), disable_shuffling=True)

    def _split_generators(self, dl_manager):
      del dl_manager  # nothing to download
      splits = {"train": self._plan.generate("train")}
      if self._plan.held_out:
        splits[HOLDOUT_SPLIT] = self._plan.generate(HOLDOUT_SPLIT)
      return splits

    def _generate_examples(self):
      raise NotImplementedError  # `_split_generators` hands out the plan's generators

  return ImageFolders


class _Plan:
  """What `build` writes: the examples, their shape and split, and what was skipped."""

  def __init__(self, files, listing, image_size, channels, crop, holdout, skip_bad, progress):
    self.files, self.listing, self.crop, self.skip_bad = files, listing, crop, skip_bad
    self.progress = progress
    self.skipped: list[tuple[str, str]] = []  # (file, why)
    self.written = {"train": 0, HOLDOUT_SPLIT: 0}
    self.class_counts = [0] * len(listing.class_names)
    # The headers only (cheap): formats, modes and sizes; decoding waits for the writing.
    keep, modes, sides = [], set(), {}
    for i, name in enumerate(listing.files):
      try:
        image = _open(files.read(name), name, load=False)
      except InputError as e:
        self._bad(name, e)
        continue
      modes.add(image.mode)
      sides.setdefault(_side(image, name, crop), name)
      keep.append(i)
    if not keep:
      raise InputError(f"--images={files.path}: none of its {len(listing.files)} images "
                       "could be read")
    self.channels = channels or (1 if modes <= set(_GREY_MODES) else 3)
    if image_size is None:
      if len(sides) > 1:
        (a, first), (b, other) = sorted(sides.items())[:2]
        raise InputError(f"{first} is {a} px and {other} is {b} px (the shorter side); give "
                         "--image_size=N to resize every image to N x N")
      image_size = next(iter(sides))
    self.image_size = int(image_size)
    count = holdout_count(holdout, len(keep))
    chosen = np.random.default_rng(0).permutation(len(keep))[:count]
    self.held_out = frozenset(keep[j] for j in chosen)
    self._keep = keep

  def _bad(self, name: str, error: InputError):
    if not self.skip_bad:
      raise InputError(f"{error}; remove it, or prepare with --skip_bad to leave out every "
                       "unreadable file (counted)")
    self.skipped.append((name, str(error)))

  def generate(self, split: str):
    indices = [i for i in self._keep if (i in self.held_out) == (split == HOLDOUT_SPLIT)]
    start, every = time.monotonic(), max(1, len(indices) // 20)
    for n, i in enumerate(indices):
      name = self.listing.files[i]
      try:
        pixels = to_pixels(_open(self.files.read(name), name, load=True), self.channels,
                           self.image_size, self.crop)
      except InputError as e:  # truncated: the header was fine, the pixels are not
        self._bad(name, e)
        continue
      example = {"image": _png(pixels), "file": name}
      if self.listing.labels is not None:
        example["label"] = self.listing.labels[i]
        self.class_counts[example["label"]] += 1
      self.written[split] += 1
      yield i, example
      if self.progress and ((n + 1) % every == 0 or n + 1 == len(indices)):
        print(f"{BUILDER}: {split} {n + 1}/{len(indices)} images ({time.monotonic() - start:.0f}"
              " s)", file=sys.stderr, flush=True)

  def record(self, name: str) -> dict:
    return {
        "dataset": f"folder:{name}", "source": os.path.abspath(self.files.path),
        "layout": self.listing.layout, "image_size": self.image_size,
        "channels": self.channels, "num_classes": len(self.listing.class_names),
        "class_names": list(self.listing.class_names),
        "class_counts": self.class_counts, "crop": self.crop,
        "splits": {k: v for k, v in self.written.items() if v},
        "skipped": [{"file": f, "error": e} for f, e in self.skipped],
        "ignored_files": self.listing.ignored,
    }


def build(images: str, name: str, data_dir: str | None = None, image_size: int | None = None,
          crop: str = "center", holdout=None, skip_bad: bool = False,
          channels: int | None = None, progress: bool = True) -> tuple[str, dict]:
  """Writes `image_folders/<name>` into `data_dir`; returns its folder and its record.

  Raises:
    InputError: an input that cannot make the dataset, in one line; nothing is left
      behind.
  """
  if not re.fullmatch(r"[a-z0-9_]+", name or ""):
    raise InputError(f"--name={name!r} must be lower-case letters, digits and '_'")
  if crop not in CROPS:
    raise InputError(f"--crop={crop!r} must be one of {CROPS}")
  if image_size is not None and not 1 <= image_size <= 4096:
    raise InputError(f"--image_size={image_size} must be in [1, 4096]")
  if channels not in (None, 1, 3):
    raise InputError(f"--channels={channels} must be 1 or 3")
  holdout_count(holdout, sys.maxsize)  # its form, before any image is read
  final = dataset_path(name, data_dir)
  if os.path.exists(final):
    raise InputError(f"{BUILDER}/{name} is already prepared at {final}; delete that folder "
                     "first, or choose another --name")
  files = _Files(images)
  try:
    plan = _Plan(files, list_examples(files), image_size, channels, crop, holdout, skip_bad,
                 progress)
    record = write_in_place(lambda where: _builder_class()(
        name=name, plan=plan, data_dir=where, file_format="array_record"),
        lambda: plan.record(name), BUILDER, name, RECORD, data_dir, InputError)
  finally:
    files.close()
  return final, record


def write_in_place(make_builder, make_record, builder_name: str, name: str, record_file: str,
                   data_dir: str | None, error) -> dict:
  """Prepares the TFDS dataset `make_builder(data_dir)` builds and writes `make_record()` as
  `record_file` beside it, all or nothing: TFDS writes into a hidden sibling of the final
  folder on the same file system (TFDS never looks in it, so a prepare killed outright
  leaves nothing it reads as a dataset), renamed into place in one step at the end and
  removed if anything fails. Returns the record; `error` (an exception class) says why the
  rename failed."""
  final = os.path.join(data_dir_or_default(data_dir), builder_name, name, VERSION)
  root = data_dir_or_default(data_dir)
  os.makedirs(root, exist_ok=True)
  incomplete = os.path.join(root, f".incomplete.{builder_name}.{name}.{uuid.uuid4().hex[:8]}")
  try:
    tfds_source.ensure_tfds_can_prepare()
    builder = make_builder(incomplete)
    builder.download_and_prepare()
    record = make_record()
    with open(os.path.join(builder.data_path, record_file), "w", encoding="utf-8") as fh:
      json.dump(record, fh, indent=1)
    os.makedirs(os.path.dirname(final), exist_ok=True)
    try:
      os.rename(builder.data_path, final)
    except OSError as e:  # another prepare of the same name finished first
      raise error(f"{builder_name}/{name} could not be moved into place at {final} "
                  f"({e.strerror}); if another prepare wrote it meanwhile, use that one, or "
                  "delete it and prepare again") from None
  finally:
    _remove_incomplete(incomplete)
  return record


def _remove_incomplete(path: str):
  shutil.rmtree(path, ignore_errors=True)


def describe(record: dict) -> str:
  """One paragraph of what a record says, for the prepare command's output."""
  classes = (f"{record['num_classes']} classes ({', '.join(record['class_names'][:10])}"
             f"{', ...' if record['num_classes'] > 10 else ''})" if record["num_classes"]
             else "unlabelled")
  splits = ", ".join(f"{k} {v}" for k, v in record["splits"].items())
  skipped = record["skipped"]
  lines = [f"{record['dataset']}: {splits} images of {record['image_size']}x"
           f"{record['image_size']}x{record['channels']}, {classes}, {record['layout']} layout"]
  if skipped:
    lines.append(f"skipped {len(skipped)} unreadable file(s): "
                 + ", ".join(s["file"] for s in skipped[:5]) + (", ..." if len(skipped) > 5
                                                                else ""))
  if record["ignored_files"]:
    lines.append(f"ignored {record['ignored_files']} file(s) that are not "
                 f"{'/'.join(IMAGE_SUFFIXES)}")
  return "\n".join(lines)


# What a config's keys must equal: the record's fields (the model's keys override nothing
# the data gives, so a model key that disagrees is a mistake too).
_CONFIG_FIELDS = {"image_size": "image_size", "num_channels": "channels",
                  "num_classes": "num_classes"}


def config_disagreement(name: str, data_dir: str | None, values: dict) -> str | None:
  """Where a config's data shape disagrees with `image_folders/<name>`'s record: one line
  naming each such key, both values and the overrides that fix them; None if all agree or
  the dataset is not prepared (its source says how to prepare it).

  Args:
    values: `{'data.image_size': 8, 'model.num_classes': 10, ...}`, the config's values of
      keys ending in image_size, num_channels or num_classes.
  """
  try:
    record = read_record(name, data_dir)
  except DatasetError:
    return None
  return record_disagreement(record, values, f"folder:{name}",
                             os.path.join(dataset_path(name, data_dir), RECORD),
                             "prepare the images again to match")


def record_disagreement(record: dict, values: dict, dataset: str, path: str,
                        remedy: str) -> str | None:
  """`config_disagreement` for any prepared dataset's `record` (with `image_size`, `channels`,
  `num_classes` and `class_names`), named `dataset`, its record at `path`; `remedy` ends the
  line."""
  what = {"image_size": f"{record['image_size']}x{record['image_size']} images",
          "channels": f"{record['channels']} channel(s)",
          "num_classes": (f"{record['num_classes']} classes ("
                          f"{', '.join(record['class_names'][:10])}"
                          f"{', ...' if record['num_classes'] > 10 else ''})"
                          if record["num_classes"] else "no classes (unlabelled)")}
  wrong = [(key, value, _CONFIG_FIELDS[key.rsplit(".", 1)[-1]]) for key, value in values.items()
           if value != record[_CONFIG_FIELDS[key.rsplit(".", 1)[-1]]]]
  if not wrong:
    return None
  said = "; ".join(f"config.{key}={value!r}, but it holds {what[field]}"
                   for key, value, field in wrong)
  fix = " ".join(f"--config.{key}={record[field]}" for key, _, field in wrong)
  return f"{dataset} disagrees with the config: {said} (its record {path}); set {fix}, or {remedy}"
