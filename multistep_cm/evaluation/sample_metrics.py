"""The sample-quality metric of a dataset, named so every report can say what it measured.

  * digits: the digits classifier's Fréchet distance to the held-out test split,
    classifier accuracy of the conditioning labels and label entropy (digits_metric.py);
  * captioned digits (the text-to-image demo): whether samples show what their prompts
    name, and the digits FD (prompt_metric.py);
  * mixture: the energy distance to a fresh sample of the true mixture (energy.py);
  * ImageNet and other image data: FID and IS with the FID InceptionV3, given its
    weights file and reference statistics (fid.py, inception.py).
"""
import dataclasses
from typing import Any, Callable

import jax
import numpy as np

from multistep_cm.config import base as config_base
from multistep_cm.data import mixture as mixture_lib
from multistep_cm.evaluation import energy

KINDS = config_base.METRIC_KINDS


@dataclasses.dataclass
class SampleMetric:
  """`metric(samples [-1, 1] floats, labels or None) -> dict of numbers`, with its provenance."""
  kind: str
  description: str  # network / reference, for report headers
  fn: Callable[[np.ndarray, np.ndarray | None], dict[str, Any]]
  primary: str  # the headline number's key (lower is better)

  def __call__(self, samples, labels=None) -> dict[str, Any]:
    return self.fn(np.asarray(samples), labels)


def resolve_kind(config, kind: str = "auto") -> str:
  if kind not in KINDS:
    raise ValueError(f"metric must be one of {KINDS}, got {kind!r}")
  if kind != "auto":
    return kind
  if config.data.dataset == "digits":
    return "digits"
  if config.data.dataset == "captioned_digits":
    return "prompts"
  if config.data.dataset == "mixture":
    return "energy"
  return "fid"


def make_metric(config, kind: str = "auto", inception_weights: str = "",
                reference_stats: str = "", num_reference: int = 10_000) -> SampleMetric | None:
  """The metric for `config`'s data; None for kind 'none'."""
  kind = resolve_kind(config, kind)
  if kind == "none":
    return None
  if kind == "digits":
    from multistep_cm.evaluation import digits_metric  # pylint: disable=g-import-not-at-top
    classifier = digits_metric.load_or_train_classifier(int(config.data.image_size))

    def digits_fn(samples, labels):
      out = digits_metric.digits_metrics(samples, labels, classifier=classifier)
      return {k: v for k, v in out.items() if isinstance(v, (int, float))}

    return SampleMetric("digits", f"digits classifier {classifier.name} features, reference: "
                        f"held-out test split", digits_fn, "fd")
  if kind == "prompts":
    from multistep_cm.evaluation import digits_metric  # pylint: disable=g-import-not-at-top
    from multistep_cm.evaluation import prompt_metric  # pylint: disable=g-import-not-at-top
    classifier = digits_metric.load_or_train_classifier(int(config.data.image_size))

    def prompts_fn(samples, prompts):
      if prompts is None:
        raise ValueError("the prompt metric judges samples against their prompts (captions)")
      out = prompt_metric.prompt_metrics(samples, prompts, classifier=classifier)
      return {k: v for k, v in out.items() if isinstance(v, (int, float))}
    return SampleMetric("prompts", f"digits classifier {classifier.name}: named digit and "
                        f"measured properties vs the prompt; FD to the held-out test split",
                        prompts_fn, "fd")
  if kind == "energy":
    mix = mixture_lib.default_mixture(dim=int(config.data.data_dim), seed=int(config.seed))
    truth = np.asarray(mix.sample(jax.random.PRNGKey(2**20 + 1), num_reference)[0])

    def energy_fn(samples, labels):
      del labels
      return {"energy_distance": energy.energy_distance(samples, truth)}

    return SampleMetric("energy", f"energy distance to {num_reference} fresh samples of the "
                        f"true mixture", energy_fn, "energy_distance")
  return _fid_metric(inception_weights, reference_stats)


def _fid_metric(inception_weights: str, reference_stats: str) -> SampleMetric:
  from multistep_cm.evaluation import fid  # pylint: disable=g-import-not-at-top
  from multistep_cm.evaluation import inception  # pylint: disable=g-import-not-at-top
  from multistep_cm.evaluation import reference_stats as ref_lib  # pylint: disable=g-import-not-at-top
  from multistep_cm.sampling import images as images_lib  # pylint: disable=g-import-not-at-top
  if not reference_stats:
    raise ValueError("FID needs reference statistics (--reference_stats / "
                     "config.evals.reference_stats): python -m "
                     "multistep_cm.evaluation.reference_stats writes them")
  variables = inception.load_inception_params(inception_weights)
  reference = fid.FeatureStats.load(reference_stats)
  resize = reference.metadata.get("resize", "tf1")

  def fid_fn(samples, labels):
    del labels
    images = images_lib.to_uint8(samples)  # measured as the saved images would be
    batch = 200
    batches = (images[i:i + batch] for i in range(0, len(images), batch))
    stats, logits = ref_lib.compute_reference_stats(
        batches, None, variables, batch_size=batch, resize=resize, progress=False,
        keep_logits=True, metadata={"data": "samples"})
    report = fid.fid_report(stats, reference)
    is_mean, is_std = fid.inception_score(logits)
    return {"fid": float(report["fid"]), "inception_score": is_mean,
            "inception_score_std": is_std}

  return SampleMetric("fid", f"{inception.NETWORK_NAME}, weights sha256 "
                      f"{inception.variables_digest(variables)[:12]}, resize {resize}, "
                      f"reference {reference.metadata.get('data', reference_stats)} "
                      f"({reference.count} images)", fid_fn, "fid")
