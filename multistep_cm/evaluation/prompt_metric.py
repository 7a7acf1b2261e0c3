"""Whether digit samples follow their prompts: the embedded text-to-image demo's metric.

  python -m multistep_cm.evaluation.prompt_metric --sanity [--image_size 8]

The paper scores text-to-image samples by FID and CLIP score on private prompts (docs/maths.md §8,
Table 6); the embedded demo replaces the CLIP score, which needs weights, by checking what the
prompt names. `prompt_metrics(images, prompts)` judges samples drawn for captions such as
"a thick slanted seven" (`data.captions`), reporting:
  digit_accuracy       fraction the digits classifier (`digits_metric`) puts in the named digit.
  <property>_accuracy  for thickness, width and slant: over the prompts that name the property,
                       the fraction whose sample has it, measured as the training captions were
                       (`captions.attributes`: the same measure, the named digit's training
                       median). Chance is 0.5 by construction of the thresholds.
  property_accuracy    the same over every (prompt, named property) pair.
  prompt_accuracy      fraction of samples with the named digit and every named property.
  fd                   the digits classifier's Fréchet distance to the test split
                       (`digits_metric`; biased by the sample count, compare at equal counts).
`--sanity` prints the metric on real test digits with their own captions, with the captions
shuffled (among all digits, and within each digit), with partial captions, and with noise added.
Measured 2026-11-27 on a shared 2-core CPU with `python -m multistep_cm.evaluation.prompt_metric
--sanity` (the 359 test digits; fd against the train split; property chance is 0.5, digit 0.1):

  test digits                digit  thickness  width  slant  prompt    fd
  own captions               0.989  1.000      1.000  1.000  0.989   19.6
  shuffled captions          0.103  0.485      0.515  0.518  0.017   19.6
  shuffled within digit      0.989  0.499      0.493  0.532  0.173   19.6
  own partial captions       0.989  1.000      1.000  1.000  0.989   19.6
  own, +N(0, 0.1^2) noise    0.986  0.947      0.939  0.950  0.838   24.7
  own, +N(0, 0.2^2) noise    0.975  0.905      0.855  0.916  0.699   37.0

The own captions' properties score 1 by construction (the same measure and thresholds made
them); the noisy rows show how far a sample's faint noise moves the measures.
"""
import argparse
import json
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from multistep_cm.data import captions
from multistep_cm.data import digits
from multistep_cm.evaluation import digits_metric


def _as_prompt_attributes(prompts, size: int) -> dict[str, np.ndarray]:
  if isinstance(prompts, Mapping):
    expected = ("digit",) + captions.PROPERTIES
    missing = [k for k in expected if k not in prompts]
    if missing:
      raise ValueError(f"prompt attributes need keys {expected}; missing {missing}")
    attrs = {k: np.asarray(prompts[k], np.int32) for k in expected}
  else:
    attrs = captions.prompt_attributes(list(prompts))
  for name, values in attrs.items():
    if values.shape != (size,):
      raise ValueError(f"prompt {name} must be [{size}] (one per sample), got {values.shape}")
  return attrs


def prompt_metrics(images, prompts, reference: str = "test",
                   classifier: digits_metric.DigitsClassifier | None = None,
                   cache_dir: str | None = None) -> dict[str, Any]:
  """Prompt-following metrics of samples (see the module docstring).

  Args:
    images: [N, S, S, 1] samples in [-1, 1], S the classifier's size (8 or 16).
    prompts: N caption strings (`captions.parse`), or a mapping with 'digit' and each of
      `captions.PROPERTIES` as int [N] (0, 1, or -1 = not named), e.g.
      `CaptionedDigitsSource.prompt_attributes`.
    reference: the digits split `fd` compares against.
    classifier: defaults to `digits_metric.load_or_train_classifier(S, cache_dir)`.
    cache_dir: where the classifier is cached.
  """
  images = np.asarray(images)
  if images.ndim != 4:
    raise ValueError(f"images must be [N, S, S, 1], got {images.shape}")
  wanted = _as_prompt_attributes(prompts, len(images))
  if classifier is None:
    classifier = digits_metric.load_or_train_classifier(images.shape[1], cache_dir)
  base = digits_metric.digits_metrics(images, wanted["digit"], reference=reference,
                                      classifier=classifier)
  digit_ok = np.argmax(classifier.predict(images), axis=-1) == wanted["digit"]
  # Properties are judged against the named digit's thresholds: a "thick seven" is thick for
  # a seven, whatever the classifier thinks the sample is.
  measured = captions.attributes(images, wanted["digit"])
  all_ok = digit_ok.copy()
  hits, named_total = 0, 0
  result = {"digit_accuracy": base["accuracy"]}
  for name in captions.PROPERTIES:
    named = wanted[name] != captions.UNSPECIFIED
    correct = measured[name] == wanted[name]
    all_ok &= correct | ~named
    result[f"{name}_accuracy"] = float(np.mean(correct[named])) if named.any() else float("nan")
    result[f"{name}_prompts"] = int(named.sum())
    hits += int(np.sum(correct & named))
    named_total += int(named.sum())
  result["property_accuracy"] = hits / named_total if named_total else float("nan")
  result["prompt_accuracy"] = float(np.mean(all_ok))
  result.update({k: base[k] for k in ("fd", "num_samples", "classifier",
                                      "classifier_weights_sha256", "reference")})
  return result


def sanity_table(image_size: int = 8, cache_dir: str | None = None, seed: int = 0
                 ) -> dict[str, dict[str, Any]]:
  """The metric on real test digits: own, shuffled and partial captions, and noisy digits.

  `fd` is against the train split here (against the test split the own digits score 0).
  """
  classifier = digits_metric.load_or_train_classifier(image_size, cache_dir)
  images, labels = digits.load_digits("test", image_size)
  true = {"digit": labels, **captions.attributes(images, labels)}
  rng = np.random.default_rng(seed)
  order = rng.permutation(len(labels))
  within = np.arange(len(labels))
  for d in range(digits.NUM_CLASSES):  # another digit of the same class's caption
    members = np.flatnonzero(labels == d)
    within[members] = rng.permutation(members)
  noise = rng.normal(size=images.shape).astype(np.float32)
  cases = {
      "own captions": (images, true),
      "shuffled captions": (images, {k: v[order] for k, v in true.items()}),
      "shuffled within digit": (images, {k: v[within] for k, v in true.items()}),
      "own partial captions": (images, {"digit": labels,
                                        **captions.draw_prompt_attributes(true, 1.0, seed)}),
      "own, +N(0, 0.1^2) noise": (images + 0.1 * noise, true),
      "own, +N(0, 0.2^2) noise": (images + 0.2 * noise, true),
  }
  return {name: prompt_metrics(x, prompts, reference="train", classifier=classifier)
          for name, (x, prompts) in cases.items()}


def main(argv: Sequence[str] | None = None):
  parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
  parser.add_argument("--sanity", action="store_true",
                      help="print the metric on real test digits with own/shuffled captions")
  parser.add_argument("--image_size", type=int, default=8, choices=(8, 16))
  parser.add_argument("--cache_dir", default=None)
  args = parser.parse_args(argv)
  if not args.sanity:
    parser.error("nothing to do: pass --sanity")
  columns = ("digit_accuracy",) + tuple(f"{p}_accuracy" for p in captions.PROPERTIES) + (
      "prompt_accuracy", "fd")
  print(f"{'test digits':24s} " + " ".join(f"{c.replace('_accuracy', ''):>9s}"
                                                for c in columns))
  table = sanity_table(args.image_size, args.cache_dir)
  for name, m in table.items():
    print(f"{name:24s} " + " ".join(f"{m[c]:9.3f}" for c in columns))
  print(json.dumps({n: {k: m[k] for k in ("classifier", "reference", "num_samples")}
                    for n, m in table.items()}, indent=1))


if __name__ == "__main__":
  main()
