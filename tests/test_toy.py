"""The toy experiment's plumbing on tiny settings (its results are the README table)."""
import numpy as np

from multistep_cm import toy


def test_toy_experiment_runs_every_mode_and_reports_every_row():
  settings = toy.ToySettings(width=32, depth=1, pretrain_steps=40, train_steps=40, batch=64,
                             num_eval=300, chunk=20, warmup=5, teacher_steps_start=8,
                             teacher_steps_end=16)
  rows = toy.run(settings, [1, 2], ["cd", "ct", "direct"], log=lambda *_: None,
                 anystep="segment_start")
  models = [(r["model"], r["steps"]) for r in rows]
  assert models[0][0].startswith("truth")
  assert ("teacher addim", 512) in models and ("teacher ddim", 8) in models
  for mode in ("CD", "CT", "DIRECT"):
    for s in (1, 2):
      row = next(r for r in rows if r["model"] == f"MCM-{mode}" and r["steps"] == s)
      assert all(np.isfinite(row[k]) for k in ("ed_truth", "ed_teacher", "ode_error"))
  # The 512-step DDIM solve is the ODE reference itself.
  assert next(r for r in rows if r["model"] == "teacher ddim" and r["steps"] == 512)[
      "ode_error"] == 0.0
  for s in (1, 2):  # one any-step model per mode, sampled at each S
    row = next(r for r in rows if r["model"] == "MCM-CD any-step (segment_start)"
               and r["steps"] == s)
    assert np.isfinite(row["ed_truth"])
  table = toy.format_table(rows)
  assert table.count("\n") == len(rows) + 1 and "MCM-DIRECT | 2" in table
