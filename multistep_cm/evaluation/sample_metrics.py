"""The sample-quality metric of a dataset, named so every report can say what it measured.

  * digits: the digits classifier's Fréchet distance to the held-out test split,
    classifier accuracy of the conditioning labels and label entropy (digits_metric.py);
  * captioned digits (the text-to-image demo): whether samples show what their prompts
    name, and the digits FD (prompt_metric.py);
  * mixture: the energy distance to a fresh sample of the true mixture (energy.py);
  * ImageNet and other image data: FID and IS with the FID InceptionV3, given its
    weights file and reference statistics (fid.py, inception.py);
  * an image folder of your own (`folder:NAME`) or any image data, `--metric=folder`: the
    Fréchet distance in a small CNN's features trained on its own training split, to its
    held-out split (folder_metric.py; nothing downloaded); `evaluate --metric=auto` picks it
    for `folder:` datasets (report.build_metric);
  * on request (`evaluate --metric=fd_dinov2,prdc`, never by default): FD-DINOv2, the
    Fréchet distance in DINOv2 ViT-L/14 features (dinov2.py), and precision, recall,
    density and coverage (prdc.py) in the features of a reference file that keeps its rows;
    and for text-conditioned runs the CLIP score of each sample against its caption
    (`--metric=clip`, clip.py).

Kinds combine (`fid,fd_dinov2,prdc`): each network runs once over the samples, the numbers
of all of them go in one row, and the first kind's number is the headline.
"""
import dataclasses
from typing import Any, Callable

import jax
import numpy as np

from multistep_cm.config import base as config_base
from multistep_cm.data import latents
from multistep_cm.data import mixture as mixture_lib
from multistep_cm.evaluation import energy

# The kinds of the metric during training (config.evals.metric), and those `evaluate` adds.
KINDS = config_base.METRIC_KINDS + ("fd_dinov2", "prdc", "clip")
FEATURE_KINDS = ("fid", "fd_dinov2", "prdc")  # measured in a feature network's space


@dataclasses.dataclass
class SampleMetric:
  """`metric(samples [-1, 1] floats, labels or None) -> dict of numbers`, with its provenance."""
  kind: str
  description: str  # network / reference, for report headers
  fn: Callable[[np.ndarray, np.ndarray | None], dict[str, Any]]
  primary: str  # the headline number's key (lower is better)

  def __call__(self, samples, labels=None) -> dict[str, Any]:
    return self.fn(np.asarray(samples), labels)


def split_kinds(kind) -> list[str]:
  """"fid,prdc" or ["fid", "prdc"] -> ["fid", "prdc"]."""
  kinds = kind.split(",") if isinstance(kind, str) else list(kind)
  return [k.strip() for k in kinds if k.strip()]


def resolve_kind(config, kind: str = "auto") -> str:
  if kind not in KINDS:
    raise ValueError(f"metric must be one of {KINDS}, got {kind!r}")
  if kind != "auto":
    return kind
  return config_base.auto_metric(config.data.dataset)


def make_metric(config, kind="auto", inception_weights: str = "", reference_stats: str = "",
                num_reference: int = 10_000, dinov2_weights: str = "", clip_weights: str = "",
                clip_tokenizer: str = "") -> SampleMetric | None:
  """The metric for `config`'s data; None for kind 'none'.

  `kind` is one kind or several (a list, or comma-separated); `reference_stats` one
  statistics file or several, comma-separated: each feature metric takes the one of its
  network (fid: Inception; fd_dinov2: DINOv2). `clip` needs `clip_weights` and
  `clip_tokenizer` (merges.txt,vocab.json or OpenAI's merges .txt.gz).

  Raises:
    ValueError: an unknown kind, 'none' with others, or a feature metric without the
      weights or reference statistics it needs (the message names the command).
    FileNotFoundError: a weights or statistics file that does not exist.
  """
  # A model of VAE latents is scored on its decoded samples, as its source dataset's images.
  config = latents.pixel_config(config)
  kinds = [resolve_kind(config, k) for k in split_kinds(kind)] or [resolve_kind(config)]
  if "none" in kinds:
    if len(kinds) > 1:
      raise ValueError(f"metric 'none' (samples only) cannot be combined with {kinds}")
    return None
  metrics, features = [], [k for k in kinds if k in FEATURE_KINDS]
  for k in dict.fromkeys(kinds):
    if k == "clip":
      metrics.append(_clip_metric(clip_weights, clip_tokenizer))
    elif k not in FEATURE_KINDS:
      metrics.append(_data_metric(config, k, num_reference))
    elif k == features[0]:  # every feature metric together, where the first was asked for
      metrics.append(_feature_metric(features, inception_weights, dinov2_weights,
                                     reference_stats))
  return metrics[0] if len(metrics) == 1 else _combined(metrics)


def _combined(metrics: list[SampleMetric]) -> SampleMetric:
  def combined_fn(samples, labels):
    out = {}
    for m in metrics:
      out.update(m.fn(samples, labels))
    return out

  return SampleMetric(",".join(m.kind for m in metrics),
                      "; ".join(m.description for m in metrics), combined_fn,
                      metrics[0].primary)


def _data_metric(config, kind: str, num_reference: int) -> SampleMetric:
  """The metrics of the project's own data: digits, prompts, energy."""
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
  if kind == "folder":
    return _folder_metric(config)
  raise ValueError(f"metric must be one of {KINDS}, got {kind!r}")


def _folder_metric(config) -> SampleMetric:
  """FD in the features of a CNN trained on the run's own data, to its held-out split."""
  from multistep_cm.data.sources import DatasetError  # pylint: disable=g-import-not-at-top
  from multistep_cm.evaluation import folder_metric  # pylint: disable=g-import-not-at-top
  size = config.data.get("image_size")
  try:
    data = folder_metric.load_data(config.data.dataset, config.data.get("data_dir"),
                                   int(size) if size else None)
  except DatasetError as e:
    raise ValueError(" ".join(str(e).split())) from None  # one line, the command in it
  classifier = folder_metric.load_or_train_classifier(data)
  reference = folder_metric.feature_stats(classifier, data.held_out)

  def folder_fn(samples, labels):
    return folder_metric.folder_metrics(samples, labels, classifier, reference)

  return SampleMetric("folder", folder_metric.describe(classifier), folder_fn, "fd")


_REFERENCE_COMMAND = ("python -m multistep_cm.evaluation.reference_stats --features={kind} "
                      "--weights=... --output=...")


def _references(reference_stats: str) -> dict[str, tuple[str, Any]]:
  """{features kind: (path, FeatureStats)} of the comma-separated statistics files."""
  from multistep_cm.evaluation import fid  # pylint: disable=g-import-not-at-top
  from multistep_cm.evaluation import reference_stats as ref_lib  # pylint: disable=g-import-not-at-top
  out = {}
  for path in (p.strip() for p in reference_stats.split(",") if p.strip()):
    stats = fid.FeatureStats.load(path)
    kind = ref_lib.features_kind(stats)
    if kind in out:
      raise ValueError(f"two reference statistics of {kind} features: {out[kind][0]} and {path}")
    out[kind] = (path, stats)
  return out


def _feature_metric(kinds: list[str], inception_weights: str, dinov2_weights: str,
                    reference_stats: str) -> SampleMetric:
  """FID/IS, FD-DINOv2 and precision/recall: each network run once over the samples."""
  from multistep_cm.evaluation import dinov2  # pylint: disable=g-import-not-at-top
  from multistep_cm.evaluation import fid  # pylint: disable=g-import-not-at-top
  from multistep_cm.evaluation import inception  # pylint: disable=g-import-not-at-top
  from multistep_cm.evaluation import prdc  # pylint: disable=g-import-not-at-top
  from multistep_cm.evaluation import reference_stats as ref_lib  # pylint: disable=g-import-not-at-top
  from multistep_cm.sampling import images as images_lib  # pylint: disable=g-import-not-at-top
  references = _references(reference_stats)
  given = ", ".join(f"{p} ({k})" for k, (p, _) in references.items()) or "none"
  # Which network each metric is measured in; prdc in DINOv2's if its rows are there.
  wants = {"fid": "inception", "fd_dinov2": "dinov2"}
  if "prdc" in kinds:
    with_rows = [k for k in ("dinov2", "inception")
                 if k in references and references[k][1].features is not None]
    if not with_rows:
      raise ValueError("precision/recall (prdc) need reference statistics that keep their "
                       f"feature rows: {_REFERENCE_COMMAND.format(kind='dinov2')} "
                       f"--keep_features (given: {given})")
    wants["prdc"] = with_rows[0]
  networks = {}
  for kind in kinds:
    net = wants[kind]
    if net not in references:
      raise ValueError(f"{kind} needs reference statistics of {net} features "
                       f"(--reference_stats / config.evals.reference_stats; "
                       f"{_REFERENCE_COMMAND.format(kind=net)} writes them); given: {given}")
    weights = inception_weights if net == "inception" else dinov2_weights
    if not weights:
      flag, command = (("--inception_weights", inception.CONVERT_COMMAND) if net == "inception"
                       else ("--dinov2_weights", dinov2.CONVERT_COMMAND))
      raise ValueError(f"{kind} needs the converted {net} weights ({flag}; {command} makes "
                       "them)")
    if net not in networks:
      reference = references[net][1]
      networks[net] = ref_lib.load_network(net, weights,
                                           reference.metadata.get("resize", "tf1"))
      # Refuse a reference of other weights or preprocessing now, not after sampling.
      fid.check_comparable(fid.FeatureStats(reference.dim, networks[net].records), reference)

  def feature_fn(samples, labels):
    del labels
    images = images_lib.to_uint8(samples)  # measured as the saved images would be
    batch = 200
    out = {}
    for net, network in networks.items():
      batches = (images[i:i + batch] for i in range(0, len(images), batch))
      asks = [k for k in kinds if wants[k] == net]
      stats, logits = network.stats(batches, None, batch_size=batch, progress=False,
                                    keep_logits="fid" in asks, keep_features="prdc" in asks,
                                    metadata={"data": "samples"})
      reference = references[net][1]
      distance = float(fid.fid_report(stats, reference)["fid"])
      if "fid" in asks:
        is_mean, is_std = fid.inception_score(logits)
        out.update(fid=distance, inception_score=is_mean, inception_score_std=is_std)
      if "fd_dinov2" in asks:
        out["fd_dinov2"] = distance
      if "prdc" in asks:
        out.update(prdc.prdc(reference.features, stats.features))
    return out

  parts = []
  for net, network in networks.items():
    path, reference = references[net]
    parts.append(f"{network.records['network']}, weights sha256 "
                 f"{network.records['weights_sha256'][:12]}, resize "
                 f"{network.records['resize']}, reference "
                 f"{reference.metadata.get('data', path)} ({reference.count} images)")
  primary = {"fid": "fid", "fd_dinov2": "fd_dinov2", "prdc": "precision"}[kinds[0]]
  return SampleMetric(",".join(kinds), "; ".join(parts), feature_fn, primary)


def _clip_metric(clip_weights: str, clip_tokenizer: str) -> SampleMetric:
  """The CLIP score of samples against their captions (the row's prompts)."""
  from multistep_cm.evaluation import clip  # pylint: disable=g-import-not-at-top
  from multistep_cm.evaluation import clip_tokenizer as tokenizer_lib  # pylint: disable=g-import-not-at-top
  from multistep_cm.evaluation import tree_io  # pylint: disable=g-import-not-at-top
  if not clip_weights or not clip_tokenizer:
    raise ValueError("clip needs the converted CLIP weights (--clip_weights; python -m "
                     "multistep_cm.evaluation.convert_clip makes them) and its tokenizer "
                     "files (--clip_tokenizer=merges.txt,vocab.json)")
  config, variables = clip.load_clip(clip_weights)
  files = [p.strip() for p in clip_tokenizer.split(",") if p.strip()]
  tokenizer = tokenizer_lib.ClipTokenizer.from_files(files[0], files[1] if len(files) > 1
                                                     else None, context=config.context)
  net = clip.Clip(config)
  images_fn = jax.jit(lambda v, x: net.apply(v, clip.preprocess(x, config),
                                             method=clip.Clip.image_features))
  texts_fn = jax.jit(lambda v, ids: net.apply(v, ids, method=clip.Clip.text_features))

  def clip_fn(samples, captions):
    if captions is None or not all(isinstance(c, str) for c in np.asarray(captions).tolist()):
      raise ValueError("the CLIP score judges samples against their captions: a "
                       "text-conditioned run")
    captions, batch, image, text = [str(c) for c in np.asarray(captions).tolist()], 100, [], []
    for i in range(0, len(samples), batch):
      image.append(np.asarray(images_fn(variables, samples[i:i + batch])))
      text.append(np.asarray(texts_fn(variables, tokenizer(captions[i:i + batch]))))
    return {"clip_score": clip.clip_score(np.concatenate(image), np.concatenate(text))}

  return SampleMetric("clip", f"{clip.network_name(config)}, weights sha256 "
                      f"{tree_io.digest(variables)[:12]}: CLIP score 100 max(cos, 0) of each "
                      "sample and its caption", clip_fn, "clip_score")
