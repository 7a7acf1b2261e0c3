"""Quality-vs-steps tables of trained runs (the `evaluate` command's logic).

Every table says what produced its numbers: the weights and checkpoint step of each
row, the sampler, the number of samples and seed, and the metric's network and
reference (evaluation/sample_metrics.py).
"""
import datetime
import os

from absl import logging

from multistep_cm import generation
from multistep_cm import runs
from multistep_cm.evaluation import sample_metrics


def evaluate_runs(workdir: str, steps, samplers, num_samples: int, seed: int, weights: str,
                  metric_kind: str = "auto", inception_weights: str = "",
                  reference_stats: str = "", batch_size: int = 500, log=logging.info):
  """Returns `(rows, header)`: one row per (run, sampler, steps), and the report's provenance."""
  run_dirs = runs.find_runs(workdir)
  steps = [int(s) for s in steps]
  metric, rows = None, []
  for run_dir in run_dirs:
    run = runs.load_run(run_dir, weights)
    if metric is None:
      metric = sample_metrics.make_metric(run.config, metric_kind, inception_weights,
                                          reference_stats)
    if run.student_steps is None:
      specs = [generation.SamplerSpec(s, k) for s in samplers for k in steps]
    else:
      specs = [run.sampler_spec(s) for s in run.step_counts if not steps or s in steps]
    for spec in specs:
      samples, labels = generation.generate(run.model, run.params, run.schedule, spec,
                                            num_samples, seed=seed, batch_size=batch_size)
      values = metric(samples, labels)
      row = {"run": run.name, "mode": run.mode, "sampler": spec.describe(), "nfe": spec.steps,
             "checkpoint_step": run.step, "weights": run.describe_weights(), **values}
      rows.append(row)
      log(f"{run.name}: {spec.describe()}: " + ", ".join(
          f"{k}={v:.4g}" for k, v in values.items() if isinstance(v, float)))
  header = {"workdir": os.path.abspath(workdir), "metric": metric.description,
            "primary": metric.primary, "num_samples": num_samples, "seed": seed,
            "weights": weights, "date": datetime.date.today().isoformat()}
  return rows, header


def to_markdown(rows, header) -> str:
  keys = [k for k in rows[0] if k not in ("run", "mode", "sampler", "nfe", "checkpoint_step",
                                          "weights")] if rows else []
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
