"""The captioned digits (the text-to-image demo, §15.4) and the prompt-following metric."""
import itertools

import numpy as np
import pytest

from multistep_cm.data import captions
from multistep_cm.data import digits
from multistep_cm.data import text_encoder
from multistep_cm.evaluation import digits_metric
from multistep_cm.evaluation import prompt_metric


# --- the fixed text encoder ------------------------------------------------------------------

def test_encoder_is_deterministic_masks_padding_and_sees_word_order():
  texts = ["a thick seven", "an upright eight", "a thin wide slanted two"]
  emb, mask = captions.encode(texts)
  assert emb.shape == (3, captions.TEXT_LEN, captions.TEXT_DIM) and emb.dtype == np.float32
  assert mask.dtype == np.int32
  # A fresh encoder from the same vocabulary and seed gives the same numbers.
  fresh = text_encoder.FixedTextEncoder(captions.VOCABULARY, captions.TEXT_DIM,
                                        captions.TEXT_LEN, captions.ENCODER_SEED)
  again, again_mask = fresh.encode(texts)
  np.testing.assert_array_equal(again, emb)
  np.testing.assert_array_equal(again_mask, mask)
  for row, text in enumerate(texts):
    n = len(text.split())
    np.testing.assert_array_equal(mask[row], [1] * n + [0] * (captions.TEXT_LEN - n))
    assert not emb[row, n:].any()  # padding is zero
    # Each token is its word's unit vector plus the unit-norm code of its position.
    words = emb[row, :n] - fresh.positions[:n]
    np.testing.assert_allclose(np.linalg.norm(words, axis=-1), 1.0, rtol=1e-5)
  np.testing.assert_allclose(np.linalg.norm(fresh.positions, axis=-1), 1.0, rtol=1e-5)
  # The same words in another order encode differently, and the same word at two positions
  # differs by exactly the difference of the position codes.
  swapped, _ = captions.encode(["a seven thick"])
  assert not np.allclose(swapped, emb[:1])
  np.testing.assert_allclose(swapped[0, 1] - emb[0, 2], fresh.positions[1] - fresh.positions[2],
                             atol=1e-6)
  # Distinct words get distinct, nearly orthogonal vectors (random unit vectors in 64-d).
  vectors = fresh.word_vectors[1:]
  cosines = vectors @ vectors.T - np.eye(len(vectors))
  assert np.abs(cosines).max() < 0.6


def test_encoder_rejects_unknown_words_and_long_captions():
  with pytest.raises(ValueError, match=r"unknown word 'purple'.*vocabulary is a an thin"):
    captions.encode(["a purple seven"])
  with pytest.raises(ValueError, match="at most 8"):
    captions.encode(["a " * 8 + "seven"])
  with pytest.raises(TypeError, match="sequence of captions"):
    captions.encode("a seven")


# --- measures and attributes -----------------------------------------------------------------

def _two_dots(size: int) -> np.ndarray:
  """Full ink at 8x8-grid cells (row 1, col 5) and (row 6, col 2), drawn at `size` px."""
  image = -np.ones((size, size))
  k = size // 8
  for row, col in ((1, 5), (6, 2)):
    image[row * k:(row + 1) * k, col * k:(col + 1) * k] = 1.0
  return image[None]


@pytest.mark.parametrize("size", [8, 16])
def test_measures_match_hand_computed_moments(size):
  # Cell centres (row, col) = (1.5, 5.5) and (6.5, 2.5): mean (4, 4), var(col) = 1.5^2,
  # var(row) = 2.5^2, cov = -3.75; a block of k x k pixels adds its own variance (1/k^2 - 1)/12
  # of a cell. The upper dot is to the right: a forward slant, -cov / var(row) > 0.
  m = captions.measure(_two_dots(size))
  block_var = (1 - (8 / size) ** 2) / 12
  np.testing.assert_allclose(m["thickness"], 2.0, rtol=1e-12)
  np.testing.assert_allclose(m["width"], np.sqrt(2.25 + block_var), rtol=1e-12)
  np.testing.assert_allclose(m["slant"], 3.75 / (6.25 + block_var), rtol=1e-12)
  # Ink at or below the 1/8 floor counts as background; an empty image measures 0.
  faint = -np.ones((1, 8, 8)) + 2 * np.float64(1 / 8)
  blank = captions.measure(np.concatenate([faint, -np.ones((1, 8, 8))]))
  for values in blank.values():
    np.testing.assert_array_equal(values, 0.0)


def test_measures_of_mirrored_digits():
  x, _ = digits.load_digits("test", 8)
  m, mirrored = captions.measure(x), captions.measure(x[:, :, ::-1])
  np.testing.assert_allclose(mirrored["slant"], -m["slant"], atol=1e-12)
  np.testing.assert_allclose(mirrored["thickness"], m["thickness"], rtol=1e-12)
  np.testing.assert_allclose(mirrored["width"], m["width"], rtol=1e-12)


def test_attributes_are_balanced_within_every_class_and_independent_of_size():
  x, y = digits.load_digits("train", 8)
  attrs = captions.attributes(x, y)
  for name in captions.PROPERTIES:
    for d in range(10):
      share = attrs[name][y == d].mean()
      assert 0.45 <= share <= 0.55, (name, d, share)
  # Every combination of the three properties occurs for every digit.
  combo = attrs["thickness"] * 4 + attrs["width"] * 2 + attrs["slant"]
  for d in range(10):
    assert len(np.unique(combo[y == d])) == 8, d
  # Measured on the 16x16 upsampled digits against the 16x16 thresholds, almost every digit
  # gets the same words.
  x16, _ = digits.load_digits("train", 16)
  attrs16 = captions.attributes(x16, y)
  for name in captions.PROPERTIES:
    assert np.mean(attrs16[name] == attrs[name]) > 0.95, name
  with pytest.raises(ValueError, match="digits 0-9"):
    captions.attributes(x[:2], np.array([3, 10]))


# --- captions and parsing --------------------------------------------------------------------

def test_captions_parse_back_to_their_attributes():
  assert captions.caption({"thickness": 1, "slant": 1}, 7) == "a thick slanted seven"
  assert captions.caption({}, 8) == "an eight"
  assert captions.caption({"width": 0, "slant": 0}, 1) == "a narrow upright one"
  assert captions.caption({"slant": 0}, 2) == "an upright two"
  seen = set()
  for digit, values in itertools.product(range(10), itertools.product((-1, 0, 1), repeat=3)):
    attrs = dict(zip(captions.PROPERTIES, values))
    text = captions.caption(attrs, digit)
    assert captions.parse(text) == (digit, attrs)
    captions.encode([text])  # every caption is in the encoder's vocabulary and length
    seen.add(text)
  assert len(seen) == 10 * 27
  for bad, match in [("a eight", "article should be 'an'"), ("a wide thick seven", "out of order"),
                     ("a big seven", "'big' is not a property word"), ("seven", "expected"),
                     ("a thick thin seven", "out of order"), ("a thick", "expected")]:
    with pytest.raises(ValueError, match=match):
      captions.parse(bad)


# --- the source ------------------------------------------------------------------------------

def test_source_yields_text_batches_with_fixed_captions():
  source = captions.CaptionedDigitsSource("train")
  x, y = digits.load_digits("train", 8)
  assert len(source) == len(y) and source.num_classes == 0
  indices = np.arange(len(y))
  batch = source.get(indices)
  assert sorted(batch) == ["image", "label", "text_embedding", "text_mask"]
  np.testing.assert_array_equal(batch["label"], 0)  # the null class of a dataset without classes
  np.testing.assert_array_equal(batch["image"], x)
  texts = source.captions(indices)
  emb, mask = captions.encode(texts)
  np.testing.assert_array_equal(batch["text_embedding"], emb)
  np.testing.assert_array_equal(batch["text_mask"], mask)
  # The captions say what the images are: parsed back, they give each image's digit and
  # its measured properties, or -1 where the caption leaves one out.
  said = source.prompt_attributes(indices)
  parsed = captions.prompt_attributes(texts)
  true = captions.attributes(x, y)
  for key in parsed:
    np.testing.assert_array_equal(parsed[key], said[key])
  np.testing.assert_array_equal(said["digit"], y)
  named = np.stack([said[p] != -1 for p in captions.PROPERTIES])
  for name, row in zip(captions.PROPERTIES, named):
    np.testing.assert_array_equal(said[name][row], true[name][row])
  partial = ~named.all(axis=0)
  assert 0.21 < partial.mean() < 0.29  # partial_share 0.25
  assert (~named.any(axis=0)).sum() > 20  # "a seven" occurs
  # Fixed by the seed; another seed or share draws other captions.
  assert captions.CaptionedDigitsSource("train").captions(indices) == texts
  assert captions.CaptionedDigitsSource("train", seed=1).captions(indices) != texts
  full = captions.CaptionedDigitsSource("train", partial_share=0.0)
  assert all(t.split()[1] in ("thin", "thick") and len(t.split()) == 5
             for t in full.captions(indices))
  with pytest.raises(ValueError, match="partial_share"):
    captions.CaptionedDigitsSource("test", partial_share=1.5)


# --- the prompt-following metric -------------------------------------------------------------

@pytest.fixture(scope="module")
def classifier():
  # The session's cached digits classifier (tests/conftest.py sets the cache directory).
  return digits_metric.load_or_train_classifier(8)


def test_metric_scores_real_digits_by_whether_captions_match(classifier):
  x, y = digits.load_digits("test", 8)
  true = {"digit": y, **captions.attributes(x, y)}
  own = prompt_metric.prompt_metrics(x, true, classifier=classifier)
  assert own["digit_accuracy"] >= 0.95
  for name in captions.PROPERTIES:
    assert own[f"{name}_accuracy"] == 1.0 and own[f"{name}_prompts"] == len(y)
  assert own["prompt_accuracy"] == pytest.approx(own["digit_accuracy"])
  assert abs(own["fd"]) < 1e-6  # against the test split itself
  # The same digits with every caption shuffled: chance on the digit and on each property.
  order = np.random.default_rng(0).permutation(len(y))
  shuffled = prompt_metric.prompt_metrics(x, {k: v[order] for k, v in true.items()},
                                          classifier=classifier)
  assert 0.04 < shuffled["digit_accuracy"] < 0.17
  for name in captions.PROPERTIES:
    assert 0.4 < shuffled[f"{name}_accuracy"] < 0.6, (name, shuffled)
  assert shuffled["prompt_accuracy"] < 0.05
  # Captions given as strings are parsed to the same prompts; properties a prompt leaves out
  # are not judged.
  texts = [captions.caption({"width": w}, d) for w, d in zip(true["width"], y)]
  as_text = prompt_metric.prompt_metrics(x, texts, classifier=classifier)
  assert as_text["width_accuracy"] == 1.0 and as_text["width_prompts"] == len(y)
  assert as_text["thickness_prompts"] == 0 and np.isnan(as_text["thickness_accuracy"])
  assert as_text["digit_accuracy"] == own["digit_accuracy"]
  with pytest.raises(ValueError, match=r"prompt digit must be \[359\]"):
    prompt_metric.prompt_metrics(x, {k: v[:10] for k, v in true.items()}, classifier=classifier)


def test_properties_are_chance_with_another_digit_of_the_class_and_survive_noise(classifier):
  table = prompt_metric.sanity_table(8)
  within = table["shuffled within digit"]
  assert within["digit_accuracy"] >= 0.95  # the digit is right, the properties are chance
  for name in captions.PROPERTIES:
    assert 0.4 < within[f"{name}_accuracy"] < 0.6
    assert table["own, +N(0, 0.1^2) noise"][f"{name}_accuracy"] > 0.85
  assert table["own captions"]["fd"] < table["own, +N(0, 0.2^2) noise"]["fd"]
