"""The embedded text-to-image demo's data: the digits with captions measured from each image.

A caption names the digit and up to three binary properties measured from the image (§15.4):
"a thick wide slanted seven", or only some of them ("a seven", "a thin seven"). Word order is
fixed: article, thickness, width, slant, digit. The properties, measured on the ink
`w = clip((x + 1) / 2 - 1/8, 0, 7/8) / (7/8)` (the 1/8 floor keeps a sample's faint background
noise from counting as ink), in units of the native 8x8 grid whatever the image size:

  thickness  "thin" / "thick"     ink mass, sum(w). The digits' height is normalised (every
                                  training image spans all 8 rows), so at a fixed digit the
                                  mass measures stroke width more than size.
  width      "narrow" / "wide"    horizontal ink spread, the standard deviation of the column
                                  under w. With the height fixed, width is the size that varies.
  slant      "upright" / "slanted"  the second-moment shear -cov(col, row) / var(row): how far
                                  the ink's column moves right per row upwards.

Each property is split at its median within each digit class over the training split
(`thresholds`), so it is balanced (about 50/50 within every class) and independent of the
digit: "thick" means thick for a seven. Within classes the three are nearly uncorrelated
(|r| <= 0.24 on train), so all eight combinations occur for every digit. Samples are judged
with the same training thresholds (`evaluation.prompt_metric`).

`CaptionedDigitsSource` is the data source: images, the null class as label, and each example's
caption (fixed by a seed; a share of them names only some properties, recorded as -1) encoded
by the fixed text encoder `encode` (`text_encoder.FixedTextEncoder`, width `TEXT_DIM`, length
`TEXT_LEN`: the `digits8_text` preset's text_dim and text_len).

Everything here is numpy: input code runs before `jax.distributed.initialize` on multi-host
jobs, so it must not start a JAX backend.
"""
from collections.abc import Mapping, Sequence
import functools

import numpy as np

from multistep_cm.data import digits
from multistep_cm.data import sources
from multistep_cm.data import text_encoder

DIGIT_NAMES = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
# Caption order. Each property's words: (value 0, value 1); value 1 = above the class median.
PROPERTIES = ("thickness", "width", "slant")
WORDS = {"thickness": ("thin", "thick"), "width": ("narrow", "wide"),
         "slant": ("upright", "slanted")}
ARTICLES = ("a", "an")
_AN_WORDS = ("eight", "upright")  # the words of the vocabulary that begin with a vowel sound
UNSPECIFIED = -1
VOCABULARY = ARTICLES + tuple(w for p in PROPERTIES for w in WORDS[p]) + DIGIT_NAMES
TEXT_DIM = 64
TEXT_LEN = 8
ENCODER_SEED = 0
_INK_FLOOR = 1.0 / 8.0


def _ink(images) -> np.ndarray:
  images = np.asarray(images, np.float64)
  if images.ndim == 4 and images.shape[-1] == 1:
    images = images[..., 0]
  if images.ndim != 3 or images.shape[1] != images.shape[2]:
    raise ValueError(f"images must be [N, S, S] or [N, S, S, 1], got {images.shape}")
  return np.clip(((images + 1.0) / 2.0 - _INK_FLOOR) / (1.0 - _INK_FLOOR), 0.0, 1.0)


def measure(images) -> dict[str, np.ndarray]:
  """The properties' raw measures, float64 [N] each, in units of the 8x8 grid.

  An image with no ink measures 0 on every property.
  """
  w = _ink(images)
  size = w.shape[1]
  scale = 8.0 / size  # pixel pitch in 8x8-grid units, so 16x16 samples measure alike
  coords = (np.arange(size) + 0.5) * scale
  mass = w.sum(axis=(1, 2))
  safe = np.where(mass > 0, mass, 1.0)
  row_mass, col_mass = w.sum(axis=2), w.sum(axis=1)
  mean_row = row_mass @ coords / safe
  mean_col = col_mass @ coords / safe
  d_row = coords[None, :] - mean_row[:, None]
  d_col = coords[None, :] - mean_col[:, None]
  var_row = np.sum(row_mass * d_row ** 2, axis=1) / safe
  var_col = np.sum(col_mass * d_col ** 2, axis=1) / safe
  cov = np.einsum("nij,ni,nj->n", w, d_row, d_col) / safe
  # Rows grow downwards, so a forward (rightward-leaning) slant has cov(col, row) < 0.
  slant = np.where(var_row > 0, -cov / np.where(var_row > 0, var_row, 1.0), 0.0)
  return {"thickness": mass * scale ** 2, "width": np.sqrt(var_col), "slant": slant}


@functools.lru_cache(maxsize=None)
def thresholds(image_size: int = 8) -> dict[str, np.ndarray]:
  """Per-class medians [10] of each measure over the training split at `image_size`.

  Computed once per process from the fixed training split, so training captions and the
  judgement of samples use the same numbers.
  """
  images, labels = digits.load_digits("train", image_size)
  values = measure(images)
  result = {}
  for name in PROPERTIES:
    medians = np.array([np.median(values[name][labels == d]) for d in range(digits.NUM_CLASSES)])
    medians.setflags(write=False)
    result[name] = medians
  return result


def attributes(images, labels) -> dict[str, np.ndarray]:
  """Each property as int32 0/1 [N]: 1 when the measure is above its class's training median.

  Args:
    images: [N, S, S(, 1)] in [-1, 1]; S picks the thresholds' image size.
    labels: int [N], the digit each image is (or is meant to be: a prompt's digit).
  """
  images = np.asarray(images)
  labels = np.asarray(labels)
  if labels.shape != images.shape[:1]:
    raise ValueError(f"labels must be [{len(images)}], got {labels.shape}")
  if labels.size and (labels.min() < 0 or labels.max() >= digits.NUM_CLASSES):
    raise ValueError(f"labels must be digits 0-9, got values {labels.min()}..{labels.max()}")
  values = measure(images)
  limits = thresholds(images.shape[1])
  return {name: (values[name] > limits[name][labels]).astype(np.int32) for name in PROPERTIES}


def caption(attrs: Mapping[str, int], label: int) -> str:
  """"a thick wide slanted seven": article, the named properties in `PROPERTIES` order, digit.

  Args:
    attrs: property -> 0, 1, or -1 (`UNSPECIFIED`, left out of the caption); a missing
      property is unspecified.
    label: the digit, 0-9.
  """
  unknown = set(attrs) - set(PROPERTIES)
  if unknown:
    raise ValueError(f"unknown properties {sorted(unknown)}; the properties are {PROPERTIES}")
  if not 0 <= int(label) < digits.NUM_CLASSES:
    raise ValueError(f"label must be a digit 0-9, got {label}")
  words = []
  for name in PROPERTIES:
    value = int(attrs.get(name, UNSPECIFIED))
    if value not in (0, 1, UNSPECIFIED):
      raise ValueError(f"{name} must be 0, 1 or {UNSPECIFIED} (unspecified), got {value}")
    if value != UNSPECIFIED:
      words.append(WORDS[name][value])
  words.append(DIGIT_NAMES[int(label)])
  article = "an" if words[0] in _AN_WORDS else "a"
  return " ".join([article] + words)


def parse(text: str) -> tuple[int, dict[str, int]]:
  """The inverse of `caption`: `(digit, {property: 0, 1 or -1})`.

  Raises:
    ValueError: the text is not a caption of the form `caption` writes (one line, naming it).
  """
  words = text.split()
  form = "article, then any of " + ", ".join(
      "/".join(WORDS[p]) for p in PROPERTIES) + " in that order, then a digit name"
  if len(words) < 2 or words[-1] not in DIGIT_NAMES or words[0] not in ARTICLES:
    raise ValueError(f"cannot parse prompt {text!r}: expected {form}")
  attrs = {name: UNSPECIFIED for name in PROPERTIES}
  position = 0  # properties must come in caption order, each at most once
  for word in words[1:-1]:
    for index, name in enumerate(PROPERTIES):
      if word in WORDS[name]:
        break
    else:
      raise ValueError(f"cannot parse prompt {text!r}: {word!r} is not a property word; "
                       f"expected {form}")
    if index < position:
      raise ValueError(f"cannot parse prompt {text!r}: {word!r} out of order; expected {form}")
    position = index + 1
    attrs[name] = WORDS[name].index(word)
  digit = DIGIT_NAMES.index(words[-1])
  if caption(attrs, digit) != " ".join(words):
    raise ValueError(f"cannot parse prompt {text!r}: the article should be "
                     f"{caption(attrs, digit).split()[0]!r}")
  return digit, attrs


def prompt_attributes(texts: Sequence[str]) -> dict[str, np.ndarray]:
  """Parses prompts into arrays: 'digit' and each property (0, 1 or -1), int32 [N]."""
  if isinstance(texts, str):
    raise TypeError("prompt_attributes takes a sequence of prompts, not one string")
  parsed = [parse(t) for t in texts]
  result = {"digit": np.array([d for d, _ in parsed], np.int32).reshape(-1)}
  for name in PROPERTIES:
    result[name] = np.array([a[name] for _, a in parsed], np.int32).reshape(-1)
  return result


@functools.lru_cache(maxsize=None)
def encoder() -> text_encoder.FixedTextEncoder:
  """The demo's fixed text encoder over `VOCABULARY`."""
  return text_encoder.FixedTextEncoder(VOCABULARY, TEXT_DIM, TEXT_LEN, ENCODER_SEED)


def encode(texts: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
  """Captions -> `(embeddings float32 [N, TEXT_LEN, TEXT_DIM], mask int32 [N, TEXT_LEN])`."""
  return encoder().encode(texts)


def draw_prompt_attributes(attrs: Mapping[str, np.ndarray], partial_share: float,
                           seed: int) -> dict[str, np.ndarray]:
  """`attrs` with some properties set to -1: a `partial_share` of rows name only some.

  Each partial row names a proper subset of the properties, drawn uniformly from all of them
  (the empty one too, "a seven"), so the model learns every way a prompt can leave a property
  unspecified.
  """
  if not 0.0 <= partial_share <= 1.0:
    raise ValueError(f"partial_share must be in [0, 1], got {partial_share}")
  size = len(attrs[PROPERTIES[0]])
  rng = np.random.default_rng(seed)
  partial = rng.random(size) < partial_share
  full = 2 ** len(PROPERTIES) - 1
  named = np.where(partial, rng.integers(0, full, size), full)  # bit i: property i named
  return {name: np.where((named >> i) & 1 == 1, attrs[name], UNSPECIFIED).astype(np.int32)
          for i, name in enumerate(PROPERTIES)}


class CaptionedDigitsSource(sources.ArraySource):
  """The digits with captions: 'image', 'label' (the null class 0), 'text_embedding', 'text_mask'.

  The caption of each example is fixed by `seed`; `captions(indices)` returns the strings and
  `prompt_attributes(indices)` what they name (for reports and the prompt metric). Captions
  never enter device batches.
  """

  def __init__(self, split: str = "train", image_size: int = 8, partial_share: float = 0.25,
               seed: int = 0):
    """Measures, captions and encodes the split.

    Args:
      split: "train", "test" or "all" (`digits.load_digits`).
      image_size: 8, 16 or 32; the properties are measured at this size, against the
        training thresholds at the same size.
      partial_share: the share of examples whose caption names only some properties.
      seed: of which examples get partial captions and which properties they name.
    """
    images, labels = digits.load_digits(split, image_size)
    self.digits = labels
    self.attributes = attributes(images, labels)
    self._prompt_attrs = draw_prompt_attributes(self.attributes, partial_share, seed)
    self._captions = [caption({p: self._prompt_attrs[p][i] for p in PROPERTIES}, labels[i])
                      for i in range(len(labels))]
    embeddings, mask = encode(self._captions)
    # No 'label' array and no classes: ArraySource gives every example the null class 0.
    super().__init__({"image": images, "text_embedding": embeddings, "text_mask": mask},
                     num_classes=0)

  def captions(self, indices: Sequence[int]) -> list[str]:
    return [self._captions[int(i)] for i in indices]

  def prompt_attributes(self, indices: Sequence[int]) -> dict[str, np.ndarray]:
    """'digit' and each property (0, 1 or -1 where the caption leaves it out), int32."""
    indices = np.asarray(indices, np.int64)
    return {"digit": self.digits[indices],
            **{name: self._prompt_attrs[name][indices] for name in PROPERTIES}}
