"""Learning curves of staged comparison runs (configs/digits_table3.py): a metric against optimizer
steps for every student, over several seeds, as a figure, a table and a JSON record.

    python -m multistep_cm.evaluation.learning_curves \
        --runs=/tmp/table3/seed0,/tmp/table3/seed1,/tmp/table3/seed2 --out=/tmp/table3/fd

Each run is a staged workdir whose stages scored themselves during training (`evals.every_steps`,
the `eval/<metric>` scalars of their event files). A stage is one curve point per evaluation:
  - a consistency student (`cd<S>`, `ct<S>`, any stage of mode cd/ct) at its own step;
  - a Progressive Distillation student (`pd<N>`) at the optimizer steps of the whole chain up to
    it: its own step plus every earlier halving's `num_train_steps` (the halvings of larger N
    in the same run), so that the N-step PD student and the N-step CD student stand on the same
    axis of training compute (each step costs both three network forwards and one backward,
    docs/results.md).
Curves are named by method and S: `cd` (aDDIM teacher step, the paper's), `cd/ddim` (Table 4's
other arm), `pd`. Seeds are the runs, named by their last path component: runs that share it
(`/tmp/a/seed0,/tmp/b/seed0`) are parts of one seed, say its S = 1, 2 and S = 4, 8 stages trained
by two commands, and may not both hold a student of the same method and S. A point's value is
the mean over the seeds that have it, with their minimum and maximum (the band of the figure).

The table gives, per curve, the last step every seed reached, its mean, its spread (max - min
over seeds) and the change over the last doubling (the value at the last step minus the value
at half of it): a curve has `flattened` when that change is smaller than the spread (as issue
31 asks), which needs at least two seeds. A second table compares CD and PD at equal compute:
each PD point beside the CD curve of the same S at the same step (or its last point
before it).
"""
import dataclasses
import datetime
import json
import os
import sys
from typing import Sequence

from absl import app
from absl import flags
import numpy as np

from multistep_cm.runtime import metric_log
from multistep_cm.sampling import inputs

COMMAND = "learning_curves"


@dataclasses.dataclass(frozen=True)
class Point:
  run: str
  method: str  # cd, cd/ddim, ct, pd
  steps: int  # S: the student's sampling steps
  step: int  # optimizer steps of training compute
  value: float


def _stage_config(path: str) -> dict:
  with open(os.path.join(path, "config.json")) as f:
    return json.load(f)


def _method(config: dict) -> str:
  loss = config["loss"]
  mode = loss["mode"]
  if mode in ("cd", "pd") and loss["teacher_solver"] != "addim":
    return f"{mode}/{loss['teacher_solver']}"
  return mode


def seed_name(run: str) -> str:
  """The seed a run belongs to: its last path component."""
  return os.path.basename(run.rstrip("/"))


def run_points(run: str, metric: str = "fd") -> list[Point]:
  """The curve points of every scored student stage of the staged workdir `run`."""
  if not os.path.isdir(run):
    raise FileNotFoundError(f"--runs: {run} is not a directory")
  stages = {}
  for name in sorted(os.listdir(run)):
    path = os.path.join(run, name)
    if os.path.isfile(os.path.join(path, "config.json")):
      stages[name] = (path, _stage_config(path))
  chain = {}  # PD: method -> {N: num_train_steps}
  for name, (_, config) in stages.items():
    if config["loss"]["mode"] == "pd":
      chain.setdefault(_method(config), {})[int(config["loss"]["student_steps"])] = int(
          config["num_train_steps"])
  points = []
  tag = f"eval/{metric}"
  for name, (path, config) in stages.items():
    loss = config["loss"]
    if loss["mode"] not in ("cd", "ct", "pd"):
      continue
    method, s = _method(config), int(loss["student_steps"])
    offset = (sum(k for n, k in chain[method].items() if n > s) if loss["mode"] == "pd" else 0)
    scalars, _ = metric_log.read_scalars(path)
    for step, value in scalars.get(tag, ()):
      points.append(Point(seed_name(run), method, s, offset + int(step), float(value)))
  return points


def gather(runs: Sequence[str], metric: str = "fd") -> tuple[list[Point], list[str]]:
  """The points of every run and the seeds (the distinct run names, in order): a seed's
  parts may not repeat a curve (ValueError naming both runs)."""
  points, owner = [], {}
  for run in runs:
    mine = run_points(run, metric)
    for key in sorted({(p.run, p.method, p.steps) for p in mine}):
      if key in owner:
        raise ValueError(f"--runs: {owner[key]} and {run} both hold seed {key[0]}'s "
                         f"{key[1]} student of S = {key[2]}")
      owner[key] = run
    points += mine
  return points, list(dict.fromkeys(seed_name(r) for r in runs))


def curves(points: Sequence[Point]) -> dict:
  """`{(method, S): [(step, mean, min, max, n)]}`, steps in order."""
  grouped = {}
  for p in points:
    grouped.setdefault((p.method, p.steps), {}).setdefault(p.step, {})[p.run] = p.value
  out = {}
  for key, by_step in grouped.items():
    rows = []
    for step in sorted(by_step):
      v = np.asarray(list(by_step[step].values()))
      rows.append((step, float(v.mean()), float(v.min()), float(v.max()), int(v.size)))
    out[key] = rows
  return out


def summary(curve: dict, num_runs: int) -> list[dict]:
  """Per curve: the last step all `num_runs` runs reached, its mean and spread, the change
  over the last doubling, and whether the curve has flattened (change < spread)."""
  rows = []
  for key in sorted(curve):
    full = [r for r in curve[key] if r[4] == num_runs] or curve[key]
    step, mean, lo, hi, n = full[-1]
    half = [r for r in full if r[0] <= step // 2]
    change = mean - half[-1][1] if half else None
    spread = hi - lo if n > 1 else None
    flat = (None if change is None or spread is None else abs(change) < spread)
    rows.append({"method": key[0], "steps": key[1], "step": step, "mean": mean, "min": lo,
                 "max": hi, "seeds": n, "half_step": half[-1][0] if half else None,
                 "change_last_doubling": change, "spread": spread, "flattened": flat})
  return rows


def _fmt(v):
  """Three significant digits (FD 29.5, an ODE error 0.173), at least one decimal."""
  if v is None:
    return "–"
  return f"{v:.1f}" if abs(v) >= 10 else f"{v:#.3g}"


def summary_markdown(rows: list[dict], metric: str) -> str:
  lines = [f"| method | S | last step | {metric} mean (min – max) | seeds | change since "
           f"half the steps | spread | flattened |", "|---|---|---|---|---|---|---|---|"]
  for r in rows:
    flat = {None: "– (one seed)" if r["seeds"] < 2 else "–", True: "yes", False: "no"}[
        r["flattened"]]
    since = _fmt(r["change_last_doubling"])
    if r["half_step"] is not None:
      since += f" (from {r['half_step']})"
    lines.append(f"| {r['method']} | {r['steps']} | {r['step']} | {_fmt(r['mean'])} "
                 f"({_fmt(r['min'])} – {_fmt(r['max'])}) | {r['seeds']} | {since} | "
                 f"{_fmt(r['spread'])} | {flat} |")
  return "\n".join(lines) + "\n"


def equal_compute_markdown(curve: dict, metric: str, other: str = "pd") -> str:
  """Each `other` point (PD) beside every consistency curve of the same S at the same step."""
  lines = [f"| S | optimizer steps | {other} {metric} | consistency students at that step |",
           "|---|---|---|---|"]
  for (method, s), rows in sorted(curve.items()):
    if method != other:
      continue
    for step, mean, lo, hi, n in rows:
      peers = []
      for (m2, s2), rows2 in sorted(curve.items()):
        if s2 == s and m2 != other:
          # Its last point at or before this compute (none: not yet scored).
          at = [r for r in rows2 if r[0] <= step]
          if at:
            when = "" if at[-1][0] == step else f" at {at[-1][0]}"
            peers.append(f"{m2}{when} {_fmt(at[-1][1])} ({_fmt(at[-1][2])} – "
                         f"{_fmt(at[-1][3])})")
          else:
            peers.append(f"{m2}: not scored by {step}")
      lines.append(f"| {s} | {step} | {_fmt(mean)} ({_fmt(lo)} – {_fmt(hi)}) | "
                   f"{'; '.join(peers) or '–'} |")
  return "\n".join(lines) + "\n"


def figure(curve: dict, metric: str, title: str):
  """A line per consistency curve (band: min to max over the seeds) and PD's points (bar: the
  same range), one colour per S; log axes. A `matplotlib.figure.Figure`, drawn without pyplot."""
  from matplotlib import figure as mpl_figure  # pylint: disable=g-import-not-at-top
  fig = mpl_figure.Figure(figsize=(8, 5), dpi=100)
  ax = fig.add_subplot()
  counts = sorted({s for _, s in curve})
  colours = {s: f"C{i}" for i, s in enumerate(counts)}
  styles = {"cd": ("-", "o"), "cd/ddim": (":", "s"), "ct": ("-.", "^"), "pd": ("--", "D")}
  for (method, s) in sorted(curve):
    rows = np.asarray(curve[(method, s)])
    line, marker = styles.get(method, ("-", "x"))
    ax.plot(rows[:, 0], rows[:, 1], line, marker=marker, markersize=5 if method == "pd" else 3,
            color=colours[s], label=f"{method.upper()}, {s} step{'s' if s > 1 else ''}")
    if rows[:, 4].max() > 1 and len(rows) > 1:
      ax.fill_between(rows[:, 0], rows[:, 2], rows[:, 3], color=colours[s], alpha=0.15,
                      linewidth=0)
    elif rows[:, 4].max() > 1:  # one point (a PD student): its seeds' range as a bar
      ax.errorbar(rows[:, 0], rows[:, 1], yerr=[rows[:, 1] - rows[:, 2], rows[:, 3] - rows[:, 1]],
                  fmt="none", ecolor=colours[s], capsize=4)
  ax.set_xscale("log")
  ax.set_yscale("log")
  for axis in (ax.xaxis, ax.yaxis):
    axis.set_major_formatter("{x:g}")
  ax.yaxis.set_minor_formatter("{x:g}")
  ax.set_xlabel("optimizer steps (PD: the whole chain to that student)")
  ax.set_ylabel(f"{metric.upper()}, lower is better")
  ax.set_title(title, fontsize="medium")
  ax.grid(True, which="both", alpha=0.3)
  ax.legend(fontsize="small", ncol=2)
  fig.tight_layout()
  return fig


_RUNS = flags.DEFINE_list("runs", None, "Staged workdirs, one per seed (or several parts of a "
                          "seed sharing its last path component).")
_METRIC = flags.DEFINE_string("metric", "fd", "The eval/<metric> scalar to plot (fd, ode_error).")
_OUT = flags.DEFINE_string("out", None, "Output prefix: <out>.png, <out>.json, <out>.md.")
_TITLE = flags.DEFINE_string("title", "", "The figure's title (default: the seeds).")


def main(argv):
  del argv
  if not _RUNS.value:
    inputs.fail(COMMAND, 2, "--runs=DIR[,DIR...] is required (the staged workdirs, one per seed)")
  try:
    points, seeds = gather(_RUNS.value, _METRIC.value)
  except (OSError, KeyError, ValueError) as e:
    inputs.fail(COMMAND, 2, str(e))
  if not points:
    inputs.fail(COMMAND, 2, f"no eval/{_METRIC.value} scalars in {','.join(_RUNS.value)} (do "
                "its stages set evals.every_steps?)")
  curve = curves(points)
  rows = summary(curve, len(seeds))
  text = (summary_markdown(rows, _METRIC.value) + "\nAt equal compute:\n\n"
          + equal_compute_markdown(curve, _METRIC.value))
  print(text)
  if _OUT.value:
    try:
      os.makedirs(os.path.dirname(os.path.abspath(_OUT.value)), exist_ok=True)
      title = _TITLE.value or ", ".join(seeds)
      figure(curve, _METRIC.value, title).savefig(_OUT.value + ".png")
      with open(_OUT.value + ".json", "w") as f:
        json.dump({"command": " ".join(["python -m multistep_cm.evaluation.learning_curves",
                                         *sys.argv[1:]]),
                   "date": datetime.date.today().isoformat(),
                   "runs": _RUNS.value, "metric": _METRIC.value, "summary": rows,
                   "curves": {f"{m} {s}": r for (m, s), r in curve.items()}}, f, indent=1)
      with open(_OUT.value + ".md", "w") as f:
        f.write(text)
    except OSError as e:
      inputs.fail(COMMAND, 6, f"cannot write {_OUT.value}.*: {e}")
    print(f"Wrote {_OUT.value}.png, .json and .md")


if __name__ == "__main__":
  app.run(main, flags_parser=inputs.flags_parser(COMMAND))
