"""Quality-vs-steps tables of trained runs and their quality-vs-NFE figure (the `evaluate`
command's logic).

Every table says what produced its numbers: the weights and checkpoint step of each
row, the sampler, the number of samples and seed, and the metric's network and
reference (evaluation/sample_metrics.py). With the metric 'none' a row holds what sampling
cost (NFE, seconds) and each row's samples are written as a PNG grid instead.
"""
import datetime
import itertools
import os
import re
import time

from absl import logging
import numpy as np

from multistep_cm.evaluation import sample_metrics
from multistep_cm.models import conditioning
from multistep_cm.sampling import generation
from multistep_cm.sampling import runs


def evaluate_runs(workdir: str, steps, samplers, num_samples: int, seed: int, weights: str,
                  metric_kind: str = "auto", inception_weights: str = "",
                  reference_stats: str = "", batch_size: int = 500, log=logging.info,
                  spacings=("uniform",), final_step: str | None = None, guidance=(),
                  dinov2_weights: str = "", grid_prefix: str | None = None,
                  clip_weights: str = "", clip_tokenizer: str = ""):
  """Returns `(rows, header)`: one row per (run, sampler, spacing, steps), and the report's
  provenance. `steps` counts steps; each row also states its NFE (Heun: 2K - 1). A student
  trained on a range of guidance scales gets a row per w of `guidance` (empty: the
  range's lower end, its default); other runs ignore it. Text-conditioned runs sample
  from `num_samples` training captions drawn with `seed` (the t2i_demo command judges
  held-out prompts at several guidance scales). `metric_kind` is one kind or several
  (sample_metrics.make_metric); with 'none' rows hold `sample_seconds` and, given
  `grid_prefix`, each row's first 100 samples go to `<grid_prefix>_<run>_<sampler>.png`."""
  run_dirs = runs.find_runs(workdir)
  specs_of = plan_specs(workdir, run_dirs, steps, samplers, spacings, final_step, guidance)
  metric, built, rows = None, False, []
  for run_dir in run_dirs:
    if not specs_of[run_dir]:
      continue
    run = runs.load_run(run_dir, weights)
    if not built:  # before anything is sampled: a metric that cannot be made is a bad flag
      built = True
      metric = build_metric(run.config, metric_kind, inception_weights, reference_stats,
                            dinov2_weights, clip_weights, clip_tokenizer)
    rows += score_run(run, specs_of[run_dir], metric, num_samples, seed, batch_size,
                      grid_prefix=grid_prefix, log=log)
  return rows, make_header(workdir, metric, num_samples, seed, weights)


def make_header(workdir: str, metric, num_samples: int, seed: int, weights: str) -> dict:
  """A table's provenance: what was evaluated, with which metric, samples, seed and weights."""
  return {"workdir": os.path.abspath(workdir),
          "metric": metric.description if metric else "none (samples only: the cost of "
          "each row, NFE and seconds with compilation, and a grid of its samples)",
          "primary": metric.primary if metric else None, "num_samples": num_samples,
          "seed": seed, "weights": weights, "date": datetime.date.today().isoformat()}


def plan_specs(workdir: str, run_dirs, steps, samplers, spacings=("uniform",),
               final_step: str | None = None, guidance=()) -> dict:
  """`{run_dir: [SamplerSpec]}`, the rows of each run, from its plan alone (the latest
  checkpoint's metadata): a choice that leaves no row to report is refused (InputError)
  before anything is loaded or sampled."""
  steps = [int(s) for s in steps]
  specs_of = {d: specs_for(runs.load_plan(d), d, steps, samplers, spacings, final_step,
                           guidance) for d in run_dirs}
  if not any(specs_of.values()):
    students = [f"{os.path.basename(d)}: {runs.load_plan(d).step_counts}"
                for d in run_dirs if runs.load_plan(d).objective.is_student]
    raise runs.InputError(
        f"--steps={','.join(map(str, steps))}: no row to report in {workdir} (its students "
        f"sample with {', '.join(students) or 'none'} steps; diffusion runs need --samplers "
        "and --steps)")
  return specs_of


def specs_for(plan, name: str, steps, samplers, spacings=("uniform",),
              final_step: str | None = None, guidance=()) -> list:
  """The samplers of one run's rows: a diffusion run's every sampler, spacing and step
  count; a student's own step counts that are in `steps` (all of them if `steps` is
  empty), at each w of `guidance` if it was trained on a range of guidance scales."""
  steps = [int(s) for s in steps]
  if not plan.objective.is_student:
    return [generation.SamplerSpec(s, k, spacing=sp,
                                   final_step=final_step if s == "addim" else None)
            for s in samplers for sp in spacings for k in steps]
  ws = [float(w) for w in guidance] if plan.guidance_range and guidance else [None]
  try:
    return [plan.sampler(s, w, name=name) for s in plan.step_counts
            if not steps or s in steps for w in ws]
  except ValueError as e:  # a guidance scale outside the range it was trained on
    raise runs.InputError(str(e)) from None


def build_metric(config, metric_kind, inception_weights: str = "", reference_stats: str = "",
                 dinov2_weights: str = "", clip_weights: str = "", clip_tokenizer: str = ""):
  """sample_metrics.make_metric, its refusals as InputError (a bad --metric). 'auto' is
  config_base.auto_metric's: on a `folder:` dataset the folder metric, which needs nothing
  downloaded, as for the trainer's evals.metric='auto'."""
  kinds = sample_metrics.split_kinds(metric_kind)
  try:
    return sample_metrics.make_metric(config, kinds, inception_weights, reference_stats,
                                      dinov2_weights=dinov2_weights,
                                      clip_weights=clip_weights, clip_tokenizer=clip_tokenizer)
  except (ValueError, FileNotFoundError) as e:
    raise runs.InputError(f"--metric={_joined(metric_kind)}: {e}") from None


def score_run(run, specs, metric, num_samples: int, seed: int, batch_size: int = 500,
              grid_prefix: str | None = None, log=logging.info) -> list[dict]:
  """One row per sampler of `specs`: `run` sampled (sharded over every device and host,
  sampling/generation.py) with the same seed for every row and scored by `metric` (None:
  each row's cost, and a grid `<grid_prefix>_<run>_<sampler>.png` given `grid_prefix`)."""
  prompts = captions = None
  if conditioning.is_text(run.model):
    # A text model samples from prompts: training captions drawn with the seed, every
    # row the same; the metric judges the samples against them.
    prompts, captions = run.plan.prompts(num_samples, seed)
  bad = runs.nonfinite_arrays(run.params)
  if bad:
    raise _nonfinite(run, f"its weights hold NaN or inf ({bad[0]}"
                     f"{f' and {len(bad) - 1} more arrays' if len(bad) > 1 else ''}); nothing "
                     f"sampled")
  rows = []
  for spec in specs:
    start = time.perf_counter()
    samples, labels = generation.generate(run.model, run.params, run.schedule, spec,
                                          num_samples, seed=seed, batch_size=batch_size,
                                          labels=prompts, decode=run.plan.decode)
    seconds = time.perf_counter() - start
    if not np.all(np.isfinite(samples)):
      raise _nonfinite(run, f"its samples with {spec.describe()} are not finite (NaN or "
                       f"inf); nothing scored or written")
    if metric is None:
      values = {"sample_seconds": seconds}
      if grid_prefix and samples.ndim == 4:
        _write_grid(samples, labels if captions is None else captions,
                    f"{grid_prefix}_{slug(run.name)}_{slug(spec.describe())}.png")
    else:
      values = metric(samples, labels if captions is None else captions)
    rows.append({"run": run.name, "mode": run.mode, "sampler": spec.describe(),
                 "nfe": spec.nfe, "steps": spec.steps, "checkpoint_step": run.step,
                 "weights": run.describe_weights(), **values})
    log(f"{run.name} (step {run.step}): {spec.describe()}: " + ", ".join(
        f"{k}={v:.4g}" for k, v in values.items() if isinstance(v, float)))
  return rows


def _nonfinite(run, what: str) -> "runs.InputError":
  """The refusal (exit 4) of a checkpoint that gives non-finite weights or samples, naming
  the checkpoint and the earlier complete ones."""
  earlier = [s for s in runs.checkpoint_steps(run.workdir) if s < run.step]
  hint = (f"; earlier checkpoints: steps {earlier} (score them with --checkpoints=STEP)"
          if earlier else "")
  return runs.InputError(f"checkpoint step {run.step} of {run.workdir} ({run.weights}): "
                         f"{what}{hint}", code=4)


def _joined(kind) -> str:
  return kind if isinstance(kind, str) else ",".join(kind)


def slug(text: str) -> str:
  return re.sub(r"[^A-Za-z0-9.=-]+", "_", text).strip("_")


def _write_grid(samples, labels, path: str):
  """The first 100 samples as a PNG grid, a row per label or prompt where there are any."""
  from multistep_cm.sampling import images  # pylint: disable=g-import-not-at-top
  shown = None
  if labels is not None and not isinstance(labels, dict):
    labels = np.asarray(labels)
    shown = (labels if labels.dtype.kind in "iu" else labels.astype(object))[:100]
  images.save_png(images.image_grid(samples[:100], shown), path)


def to_markdown(rows, header) -> str:
  keys = [k for k in rows[0] if k not in ("run", "mode", "sampler", "nfe", "steps",
                                          "checkpoint_step", "weights")] if rows else []
  keys.sort(key=lambda k: (k != header["primary"], k))
  lines = [f"Evaluation of `{header['workdir']}` ({header['date']}): {header['num_samples']} "
           f"samples per row, seed {header['seed']}, weights `{header['weights']}`.",
           f"Metric: {header['metric']}.", "",
           "| run | sampler | NFE | " + " | ".join(keys) + " | checkpoint |",
           "|---|---|---|" + "---|" * len(keys) + "---|"]
  for r in rows:
    vals = " | ".join(f"{r[k]:.4g}" if isinstance(r.get(k), float) else str(r.get(k, "-"))
                      for k in keys)
    lines.append(f"| {r['run']} | {r['sampler']} | {r['nfe']} | {vals} | "
                 f"step {r['checkpoint_step']} |")
  return "\n".join(lines) + "\n"


# Axis names of the metrics' primary numbers (sample_metrics.SampleMetric.primary).
METRIC_NAMES = {"fd": "digits FD", "fid": "FID", "energy_distance": "energy distance",
                 "fd_dinov2": "FD-DINOv2", "precision": "precision", "clip_score": "CLIP score"}
HIGHER_IS_BETTER = ("precision", "recall", "density", "coverage", "clip_score")


def _sampler_family(sampler: str) -> str:
  """A sampler's description without its step count: the name of its curve."""
  return re.sub(r", \d+ steps?\b", "", sampler)


def quality_figure(rows, header):
  """The report as a figure: the primary metric against NFE (log axis), a line per diffusion
  run and sampler, a point per student at its S. A `matplotlib.figure.Figure`, drawn without
  pyplot (no GUI backend, nothing global is switched)."""
  from matplotlib import figure  # pylint: disable=g-import-not-at-top
  primary = header["primary"]
  curves, points = {}, []
  for r in rows:
    if not isinstance(r.get(primary), float):
      continue
    nfe = int(r.get("nfe", r.get("steps", 0)))
    if r["mode"] == "diffusion":
      curves.setdefault(f"{r['run']}: {_sampler_family(r['sampler'])}", []).append(
          (nfe, r[primary]))
    else:
      points.append((f"{r['run']}: {r['mode'].upper()}, S={r.get('steps', nfe)}", nfe,
                     r[primary]))
  fig = figure.Figure(figsize=(7, 4.5), dpi=100)
  ax = fig.add_subplot()
  # Samplers often overlap (DDIM and aDDIM at many steps): each its own marker and dashes.
  for (label, xy), marker, dashes in zip(curves.items(), itertools.cycle("osD^v"),
                                         itertools.cycle(["-", "--", ":", "-."])):
    x, y = zip(*sorted(xy))
    ax.plot(x, y, marker=marker, markersize=5, linestyle=dashes, label=label)
  for label, x, y in points:
    ax.plot([x], [y], linestyle="none", marker="*", markersize=14, label=label)
  ax.set_xscale("log", base=2)
  values = [y for xy in curves.values() for _, y in xy] + [y for _, _, y in points]
  if values and min(values) > 0 and max(values) >= 10 * min(values):
    # Few-step samplers are an order of magnitude worse: a log axis keeps the good end legible.
    ax.set_yscale("log")
    ax.yaxis.set_major_formatter("{x:g}")
    ax.yaxis.set_minor_formatter("{x:g}")
  ax.xaxis.set_major_formatter("{x:g}")
  ax.set_xlabel("NFE (network evaluations per sample), log scale")
  better = "higher" if primary in HIGHER_IS_BETTER else "lower"
  ax.set_ylabel(f"{METRIC_NAMES.get(primary, primary)}, {better} is better")
  ax.set_title(f"{os.path.basename(header['workdir'].rstrip('/'))}: {header['num_samples']} "
               f"samples per point, seed {header['seed']}, weights {header['weights']}",
               fontsize="medium")
  ax.grid(True, which="both", alpha=0.3)
  if curves or points:
    ax.legend(fontsize="small")
  fig.tight_layout()
  return fig


def write_figure(rows, header, prefix: str) -> str:
  """Writes `quality_figure` as `<prefix>.png` and, as image `quality_vs_nfe` at the newest
  checkpoint step, to TensorBoard events in the directory `<prefix>` (a run of that name
  beside the trained ones under `tensorboard --logdir`). Returns the PNG's path."""
  import io  # pylint: disable=g-import-not-at-top
  from PIL import Image  # pylint: disable=g-import-not-at-top
  from multistep_cm.runtime import metric_log  # pylint: disable=g-import-not-at-top
  buffer = io.BytesIO()
  quality_figure(rows, header).savefig(buffer, format="png")
  with open(prefix + ".png", "wb") as fh:
    fh.write(buffer.getvalue())
  picture = np.asarray(Image.open(buffer).convert("RGB"))
  writer = metric_log.create_writer(prefix)
  writer.write_images(max((r["checkpoint_step"] for r in rows), default=0),
                      {"quality_vs_nfe": picture[None]})
  writer.close()
  return prefix + ".png"
