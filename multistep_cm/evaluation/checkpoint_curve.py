"""Every selected checkpoint of a run sampled and scored: the metric against training step
(the `evaluate --checkpoints` command's logic).

`parse_selection` reads `every:K` (the checkpoints whose step is a multiple of K, and the
latest), `all` or `S1,S2,...`; `select_steps` applies it to a run's checkpoints.
`evaluate_checkpoints` samples each selected checkpoint with report.score_run (sharded over
every device and host) and keeps the rows in a JSON record that a later call extends: a
(run, checkpoint, sampler) already recorded is not sampled again, so an interrupted or
repeated call resumes. Each checkpoint's numbers also go to TensorBoard on its run's own
step axis, in `<run>/eval_checkpoints/<name>/`, apart from the trainer's event files;
`curve_figure` plots the headline metric against training step.
"""
import dataclasses
import datetime
import json
import os

from absl import logging
import jax
import numpy as np

from multistep_cm.evaluation import report
from multistep_cm.sampling import runs

EVENTS_DIR = "eval_checkpoints"  # under each run: this command's TensorBoard events
# The settings every row of one record shares: a call asking for others is refused.
SHARED = ("metric", "num_samples", "seed", "weights", "batch_size")
_ROW_KEYS = ("run", "mode", "sampler", "nfe", "steps", "checkpoint_step", "weights")


@dataclasses.dataclass(frozen=True)
class Selection:
  """Which checkpoints of a run to score: `kind` 'all', 'every' (step multiple of `every`,
  and the latest) or 'steps' (exactly `steps`)."""
  text: str
  kind: str
  every: int = 0
  steps: tuple[int, ...] = ()


def parse_selection(text: str) -> Selection:
  """`all`, `every:K` (K > 0) or `S1,S2,...` (steps >= 0); raises InputError naming
  `--checkpoints`."""
  flag = f"--checkpoints={text}"
  text = text.strip()
  if text == "all":
    return Selection(text, "all")
  if text.startswith("every:"):
    k = text[len("every:"):].strip()
    if not (k.isdigit() and int(k) > 0):
      raise runs.InputError(f"{flag}: every:K takes a positive number of training steps K, "
                            f"got {k!r}")
    return Selection(text, "every", every=int(k))
  parts = [p.strip() for p in text.split(",")]
  bad = [p for p in parts if not p.isdigit()]
  if not text or bad:
    raise runs.InputError(f"{flag}: {bad or 'nothing'} is not a checkpoint step (takes all, "
                          "every:K or comma-separated steps S1,S2,...)")
  return Selection(text, "steps", steps=tuple(sorted({int(p) for p in parts})))


def select_steps(selection: Selection, available, run_dir: str) -> list[int]:
  """The steps of `available` (a run's checkpoints) that `selection` names, oldest first;
  InputError for a step the run has no checkpoint of (naming those it has)."""
  available = sorted(available)
  if selection.kind == "all":
    return available
  if selection.kind == "every":
    return sorted({s for s in available if s % selection.every == 0} | set(available[-1:]))
  missing = [s for s in selection.steps if s not in available]
  if missing:
    raise runs.InputError(f"--checkpoints={selection.text}: {run_dir} has no checkpoint of "
                          f"step {', '.join(map(str, missing))}; its checkpoints are of "
                          f"steps {available}")
  return list(selection.steps)


def events_dir(run_dir: str, prefix: str) -> str:
  """Where a run's per-checkpoint scalars go: `<run>/eval_checkpoints/<output's name>`."""
  return os.path.join(run_dir, EVENTS_DIR, os.path.basename(prefix))


def load_record(path: str):
  """`(header, rows)` of a record written by `evaluate_checkpoints`; None if there is none."""
  if not os.path.exists(path):
    return None
  try:
    with open(path) as fh:
      record = json.load(fh)
    return record["header"], list(record["rows"])
  except (OSError, ValueError, KeyError, TypeError) as e:
    raise runs.InputError(f"--output: {path} is not a checkpoint record that can be read "
                          f"({e}); name another --output or remove it") from None


def write_json(path: str, header: dict, rows):
  """`{"header", "rows"}` as JSON, replaced whole (a reader never sees half of it)."""
  tmp = f"{path}.tmp{os.getpid()}"
  with open(tmp, "w") as fh:
    json.dump({"header": header, "rows": rows}, fh, indent=2,
              default=lambda o: o.item() if isinstance(o, np.generic) else str(o))
  os.replace(tmp, path)


def row_key(row) -> tuple:
  return row["run"], int(row["checkpoint_step"]), row["sampler"]


def _agreed(flags: np.ndarray) -> np.ndarray:
  """Process 0's `flags` on every process: every host samples the same checkpoints even
  where only process 0 could read the record."""
  if jax.process_count() == 1:
    return flags
  from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
  return np.asarray(multihost_utils.broadcast_one_to_all(flags))


def evaluate_checkpoints(workdir: str, selection: Selection, steps, samplers,
                         num_samples: int, seed: int, weights: str, prefix: str,
                         metric_kind="auto", batch_size: int = 500, log=logging.info,
                         spacings=("uniform",), final_step: str | None = None, guidance=(),
                         inception_weights: str = "", reference_stats: str = "",
                         dinov2_weights: str = "", clip_weights: str = "",
                         clip_tokenizer: str = ""):
  """Scores the selected checkpoints of each run under `workdir` (one run or a staged root)
  with the rows `report.evaluate_runs` gives a run's latest checkpoint; returns `(rows,
  header, scored)`: every row of the record `<prefix>.json` (this call's and earlier
  ones'), its provenance, and how many rows this call sampled.

  Everything is checked before anything is sampled (InputError): the selection against
  each run's checkpoints, the step counts, the metric, and that a record already at
  `<prefix>.json` holds the same settings (`SHARED`). After each checkpoint, process 0
  rewrites the record and writes its numbers to TensorBoard at the checkpoint's step."""
  run_dirs = runs.find_runs(workdir)
  chosen = {d: select_steps(selection, runs.checkpoint_steps(d), d) for d in run_dirs}
  specs_of = report.plan_specs(workdir, run_dirs, steps, samplers, spacings, final_step,
                               guidance)
  first = next(d for d in run_dirs if specs_of[d])
  metric = report.build_metric(runs.load_plan(first).config, metric_kind, inception_weights,
                               reference_stats, dinov2_weights, clip_weights, clip_tokenizer)
  header = dict(report.make_header(workdir, metric, num_samples, seed, weights),
                batch_size=batch_size)
  recorded = load_record(prefix + ".json")
  rows = []
  if recorded is not None:
    old, rows = recorded
    differ = [k for k in SHARED if old.get(k) != header[k]]
    if differ:
      raise runs.InputError(
          f"--output={prefix}: {prefix}.json records checkpoints scored with other settings ("
          + "; ".join(f"{k} {old.get(k)!r} there, {header[k]!r} here" for k in differ)
          + "); name another --output or remove it")
  done = {row_key(r) for r in rows}
  # What each checkpoint still lacks, from its metadata alone (a student's samplers come
  # from the checkpoint it is loaded from).
  candidates = []
  for run_dir in run_dirs:
    for step in chosen[run_dir] if specs_of[run_dir] else []:
      plan = runs.load_plan(run_dir, step)
      candidates.extend((run_dir, step, spec) for spec in report.specs_for(
          plan, run_dir, steps, samplers, spacings, final_step, guidance))
  needed = _agreed(np.array([(os.path.basename(os.path.normpath(d)), s, spec.describe())
                             not in done for d, s, spec in candidates], bool))
  todo = [c for c, n in zip(candidates, needed) if n]
  main_process = jax.process_index() == 0
  scored = 0
  writers = {}
  try:
    for run_dir, step in dict.fromkeys((d, s) for d, s, _ in todo):
      specs = [spec for d, s, spec in todo if (d, s) == (run_dir, step)]
      run = runs.load_run(run_dir, weights, step=step)
      new = report.score_run(run, specs, metric, num_samples, seed, batch_size,
                             grid_prefix=f"{prefix}_step{step}" if metric is None else None,
                             log=log)
      rows.extend(new)
      scored += len(new)
      if main_process:
        header["date"] = datetime.date.today().isoformat()
        write_json(prefix + ".json", header, rows)
        if run_dir not in writers:
          from multistep_cm.runtime import metric_log  # pylint: disable=g-import-not-at-top
          writers[run_dir] = metric_log.create_writer(events_dir(run_dir, prefix))
        writers[run_dir].write_scalars(step, scalars(new))
        writers[run_dir].flush()
  finally:
    for writer in writers.values():
      writer.close()
  rows.sort(key=lambda r: (r["run"], int(r["nfe"]), r["sampler"], int(r["checkpoint_step"])))
  return rows, header, scored


def scalars(rows) -> dict[str, float]:
  """`{'<number>/<sampler>': value}`: each row's measured numbers (floats; counts such as
  `num_samples` are not curves), tagged by its sampler."""
  out = {}
  for r in rows:
    for key, value in r.items():
      if key not in _ROW_KEYS and isinstance(value, float):
        out[f"{key}/{report.slug(r['sampler'])}"] = float(value)
  return out


def to_markdown(rows, header) -> str:
  """The record as a table: a row per (run, sampler, checkpoint), the headline first; a
  number that is the same in every row (a count, the classifier's own accuracy) is said
  once above the table."""
  keys = sorted({k for r in rows for k in r if k not in _ROW_KEYS},
                key=lambda k: (k != header["primary"], k))
  same = {k: rows[0].get(k) for k in keys if len(rows) > 1 and k != header["primary"]
          and all(r.get(k) == rows[0].get(k) for r in rows)}
  keys = [k for k in keys if k not in same]
  lines = [f"Checkpoints of `{header['workdir']}` ({header['date']}): "
           f"{header['num_samples']} samples per row, seed {header['seed']}, weights "
           f"`{header['weights']}`, batch {header['batch_size']}.",
           f"Metric: {header['metric']}."]
  if same:
    lines.append("In every row: " + ", ".join(
        f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}" for k, v in same.items()) + ".")
  lines += ["", "| run | training step | sampler | NFE | " + " | ".join(keys) + " |",
            "|---|---|---|---|" + "---|" * len(keys)]
  for r in rows:
    vals = " | ".join(f"{r[k]:.4g}" if isinstance(r.get(k), float) else str(r.get(k, "-"))
                      for k in keys)
    lines.append(f"| {r['run']} | {r['checkpoint_step']} | {r['sampler']} | {r['nfe']} | "
                 f"{vals} |")
  return "\n".join(lines) + "\n"


def curve_figure(rows, header):
  """The headline metric against training step: a line per run and sampler. A
  `matplotlib.figure.Figure`, drawn without pyplot."""
  import itertools  # pylint: disable=g-import-not-at-top
  from matplotlib import figure  # pylint: disable=g-import-not-at-top
  primary = header["primary"]
  curves = {}
  for r in rows:
    if isinstance(r.get(primary), float):
      curves.setdefault(f"{r['run']}: {r['sampler']}", []).append(
          (int(r["checkpoint_step"]), r[primary]))
  fig = figure.Figure(figsize=(7, 4.5), dpi=100)
  ax = fig.add_subplot()
  for (label, xy), marker in zip(curves.items(), itertools.cycle("osD^v*")):
    x, y = zip(*sorted(xy))
    ax.plot(x, y, marker=marker, markersize=5, label=label)
  values = [y for xy in curves.values() for _, y in xy]
  if values and min(values) > 0 and max(values) >= 10 * min(values):
    ax.set_yscale("log")
    ax.yaxis.set_major_formatter("{x:g}")
    ax.yaxis.set_minor_formatter("{x:g}")
  ax.set_xlabel("training step (of each run)")
  better = "higher" if primary in report.HIGHER_IS_BETTER else "lower"
  ax.set_ylabel(f"{report.METRIC_NAMES.get(primary, primary)}, {better} is better")
  ax.set_title(f"{os.path.basename(header['workdir'].rstrip('/'))}: {header['num_samples']} "
               f"samples per point, seed {header['seed']}, weights {header['weights']}",
               fontsize="medium")
  ax.grid(True, which="both", alpha=0.3)
  if curves:
    ax.legend(fontsize="small")
  fig.tight_layout()
  return fig
