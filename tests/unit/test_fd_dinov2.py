"""FD-DINOv2 and precision/recall as sample metrics (sample_metrics.make_metric), on the
embedded digits upsampled to DINOv2's 224 px. The DINOv2 here has random weights (2 blocks,
64 wide): what these tests show is the wiring and the identities (a set against itself),
and that even random features order real > blurred > noise; not what the published
weights would score."""
import ml_collections
import numpy as np
import pytest
import scipy.ndimage

from multistep_cm.data import digits
from multistep_cm.evaluation import dinov2
from multistep_cm.evaluation import reference_stats
from multistep_cm.evaluation import sample_metrics
from multistep_cm.evaluation import tree_io
from multistep_cm.sampling import images as images_lib

TINY = dinov2.Dinov2Config(64, 2, 4, 128, pos_grid=4)
CONFIG = ml_collections.ConfigDict({"data": {"dataset": "digits"}, "seed": 0})


@pytest.fixture(scope="module")
def files(tmp_path_factory):
  """Random DINOv2 weights, and reference statistics (with rows) of 200 training digits at
  32 px."""
  root = tmp_path_factory.mktemp("fd_dinov2")
  weights = str(root / "dinov2.npz")
  dinov2.save_dinov2(weights, TINY, dinov2.random_variables(TINY, seed=0))
  train, _ = digits.load_digits("train", 32)
  np.savez(root / "train.npz", images=images_lib.to_uint8(train[:200]))
  ref = str(root / "ref.npz")
  reference_stats.main([f"--images_npz={root / 'train.npz'}", "--features=dinov2",
                        f"--weights={weights}", "--keep_features", f"--output={ref}",
                        "--batch_size=104"])
  return weights, ref, train[:200]


def test_the_reference_against_itself_scores_zero_and_full_precision_recall(files):
  weights, ref, train = files
  metric = sample_metrics.make_metric(CONFIG, "fd_dinov2,prdc", dinov2_weights=weights,
                                      reference_stats=ref)
  out = metric(train)
  assert metric.primary == "fd_dinov2" and "DINOv2" in metric.description
  assert abs(out["fd_dinov2"]) < 1e-6
  assert out["precision"] == out["recall"] == out["coverage"] == 1.0


def test_real_digits_rank_above_blurred_above_noise(files):
  """Held-out digits, the same blurred (Gaussian, sigma 1.5 px), and uniform noise, each 100,
  against the training digits' statistics."""
  weights, ref, _ = files
  test, _ = digits.load_digits("test", 32)
  test = test[:100]
  rng = np.random.default_rng(0)
  sets = {"real": test,
          "blurred": scipy.ndimage.gaussian_filter(test, (0, 1.5, 1.5, 0)),
          "noise": rng.uniform(-1, 1, test.shape).astype(np.float32)}
  metric = sample_metrics.make_metric(CONFIG, ["fd_dinov2", "prdc"], dinov2_weights=weights,
                                      reference_stats=ref)
  scores = {name: metric(x) for name, x in sets.items()}
  fd = {name: s["fd_dinov2"] for name, s in scores.items()}
  assert fd["real"] < fd["blurred"] < fd["noise"], fd
  assert scores["noise"]["precision"] < scores["real"]["precision"], scores


def test_combined_with_a_data_metric_in_one_row(files, monkeypatch):
  """`digits,fd_dinov2`: the data metric's numbers and the feature metric's in one row, the
  first kind's headline (the digits classifier is stood in for by the mean pixel)."""
  weights, ref, train = files
  mean_pixel = sample_metrics.SampleMetric("digits", "mean pixel",
                                           lambda x, labels: {"fd": float(x.mean())}, "fd")
  monkeypatch.setattr(sample_metrics, "_data_metric", lambda *args: mean_pixel)
  metric = sample_metrics.make_metric(CONFIG, "digits,fd_dinov2", dinov2_weights=weights,
                                      reference_stats=ref)
  out = metric(train)
  assert metric.primary == "fd" and metric.description.startswith("mean pixel; DINOv2")
  assert out["fd"] == pytest.approx(float(train.mean())) and abs(out["fd_dinov2"]) < 1e-6
  assert set(out) == {"fd", "fd_dinov2"}


@pytest.mark.parametrize("kind,extra,fragment", [
    ("fd_dinov2", {}, "--features=dinov2"),
    ("fd_dinov2", {"reference_stats": "REF"}, "--dinov2_weights"),
    ("fid", {"reference_stats": "REF"}, "statistics of inception features"),
    ("prdc", {"reference_stats": "NOROWS"}, "--keep_features"),
    ("none,fid", {}, "cannot be combined"),
    ("psnr", {}, "must be one of"),
])
def test_what_a_metric_lacks_is_named(files, tmp_path, kind, extra, fragment):
  weights, ref, _ = files
  stats = reference_stats.fid.FeatureStats.load(ref)
  stats.features = None
  stats.save(str(tmp_path / "norows.npz"))
  extra = {k: {"REF": ref, "NOROWS": str(tmp_path / "norows.npz")}[v] for k, v in extra.items()}
  if kind == "prdc":
    extra["dinov2_weights"] = weights
  with pytest.raises(ValueError, match=fragment):
    sample_metrics.make_metric(CONFIG, kind, **extra)


def test_a_reference_of_other_weights_is_refused_before_sampling(files, tmp_path):
  _, ref, _ = files
  other = str(tmp_path / "other.npz")
  dinov2.save_dinov2(other, TINY, dinov2.random_variables(TINY, seed=1))
  with pytest.raises(ValueError, match="weights_sha256"):
    sample_metrics.make_metric(CONFIG, "fd_dinov2", dinov2_weights=other, reference_stats=ref)


def test_evaluation_during_training_scores_fd_dinov2_and_precision_recall(files):
  """`evals.metric=fd_dinov2` and `prdc`: the trainer's evaluator (a tiny digits network at
  its random initialisation) reports the numbers under eval/, and a config that lacks the
  weights or the reference is refused before anything compiles, naming the key and the
  command that makes the file."""
  import jax  # pylint: disable=g-import-not-at-top
  from multistep_cm.config import checks as config_checks  # pylint: disable=g-import-not-at-top
  from multistep_cm.config import plan as plan_lib  # pylint: disable=g-import-not-at-top
  from multistep_cm.evaluation import in_training  # pylint: disable=g-import-not-at-top
  from multistep_cm.models import partitioning  # pylint: disable=g-import-not-at-top
  from multistep_cm.runtime import sharding  # pylint: disable=g-import-not-at-top
  from multistep_cm.training import step as train_step  # pylint: disable=g-import-not-at-top
  import helpers  # pylint: disable=g-import-not-at-top
  weights, ref, _ = files
  config = helpers.tiny_digits("diffusion", sample_steps=2)
  config.evals.update(every_steps=10, num_samples=24, batch_size=24, metric="prdc",
                      dinov2_weights=weights, reference_stats=ref)
  config_checks.validate(config, num_devices=8, num_processes=1)
  plan = plan_lib.RunPlan.from_config(config)
  params = partitioning.unbox(train_step.init_params(plan.model, jax.random.PRNGKey(0)))
  out = in_training.TrainingEvaluator(plan, sharding.make_mesh(config.mesh))(params)
  assert {"eval/precision", "eval/recall", "eval/density", "eval/coverage"} <= set(out), out
  assert all(np.isfinite(v) for v in out.values())
  for metric, unset, fragment in (
      ("fd_dinov2", "dinov2_weights", "convert_dinov2 --src="),
      ("fd_dinov2", "reference_stats", "--features=dinov2 --weights="),
      ("prdc", "reference_stats", "--keep_features")):
    bad = config.copy_and_resolve_references()
    bad.evals.metric, bad.evals[unset] = metric, ""
    with pytest.raises(config_checks.ConfigError,
                       match=f"config.evals.metric='{metric}', which needs config.evals.{unset}"
                       ) as info:
      config_checks.validate(bad, num_devices=8, num_processes=1)
    assert fragment in str(info.value) and "\n" not in str(info.value)
