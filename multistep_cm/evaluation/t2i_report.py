"""The text-to-image demo's report (the `t2i_demo` command): teacher and students sampled on
held-out prompts and judged by the prompt metric; see multistep_cm/t2i_demo.py."""
import numpy as np

COLUMNS = ("digit_accuracy", "thickness_accuracy", "width_accuracy", "slant_accuracy",
           "prompt_accuracy", "fd")


def evaluate(root: str, num: int, scales, teacher_steps: int = 0, seed: int = 0,
             weights: str = "ema0", grid_prompts: int = 6, grid_cols: int = 8):
  """`(rows, picture)`: one row per (model, w) with the prompt metric, and the grid."""
  from multistep_cm.evaluation import sample_metrics  # pylint: disable=g-import-not-at-top
  from multistep_cm.sampling import generation  # pylint: disable=g-import-not-at-top
  from multistep_cm.sampling import images  # pylint: disable=g-import-not-at-top
  from multistep_cm.sampling import prompts  # pylint: disable=g-import-not-at-top
  from multistep_cm.sampling import runs  # pylint: disable=g-import-not-at-top

  paths = runs.find_runs(root)
  loaded = [runs.load_run(p, weights) for p in paths]
  teachers = [r for r in loaded if not r.plan.objective.is_student]
  students = sorted((r for r in loaded if r.plan.objective.is_student),
                    key=lambda r: float(r.config.loss.guidance_scale))
  if len(teachers) != 1:
    raise ValueError(f"{root} must hold one text-conditioned diffusion run (the teacher), "
                     f"found {len(teachers)}")
  teacher = teachers[0]
  if teacher.config.data.dataset != "captioned_digits":
    raise ValueError(f"{teacher.workdir} was not trained on captioned_digits "
                     f"(data.dataset={teacher.config.data.dataset!r})")
  texts, cond = prompts.held_out_digits(num, seed, int(teacher.config.data.image_size))
  metric = sample_metrics.make_metric(teacher.config, "prompts")

  def row(run, spec, name, w, distilled_at=None):
    samples, _ = generation.generate(run.model, run.params, run.schedule, spec, num, seed=seed,
                                     labels=cond, progress=True)
    out = metric(samples, texts)
    print(f"{name}: " + ", ".join(f"{k} {out[k]:.3f}" for k in COLUMNS), flush=True)
    return ({"model": name, "guidance": w, "distilled_at": distilled_at, "nfe": spec.nfe,
             "sampler": spec.describe(), "step": run.step, "workdir": run.workdir,
             **{k: out[k] for k in COLUMNS}}, samples)

  rows, shown = [], {}
  for w in scales:
    spec = teacher.sampler_spec(teacher_steps, guidance=w)
    r, samples = row(teacher, spec, "teacher", w)
    rows.append(r)
    shown[("teacher", w)] = samples
  for run in students:
    w = float(run.config.loss.guidance_scale)
    spec = run.sampler_spec()
    r, samples = row(run, spec, f"{spec.steps}-step CD student", 0.0, distilled_at=w)
    rows.append(r)
    shown[("student", w)] = samples

  # The picture: per prompt, the teacher (guided at the largest w) then the student
  # distilled at that w, on the first `grid_cols` samples drawn for that prompt.
  w = max(scales)
  order = [i for i in dict.fromkeys(texts)][:grid_prompts]
  tiles, labels = [], []
  for text in order:
    where = [i for i, t in enumerate(texts) if t == text][:grid_cols]
    for who in ("teacher", "student"):
      if (who, w) not in shown:
        continue
      tiles.append(shown[(who, w)][where])
      tag = f"teacher w={w:g}" if who == "teacher" else f"student ({w:g})"
      labels += [f"{text} | {tag}"] * len(where)
  picture = images.image_grid(np.concatenate(tiles), np.asarray(labels, dtype=object))
  return rows, picture


def to_markdown(rows) -> str:
  head = ("| model | w | NFE | digit acc | thickness | width | slant | prompt acc | FD |\n"
          "|---|---|---|---|---|---|---|---|---|\n")
  lines = []
  for r in rows:
    w = (f"{r['guidance']:g}" if r["distilled_at"] is None
         else f"distilled at {r['distilled_at']:g}")
    lines.append(f"| {r['model']} | {w} | {r['nfe']} | " + " | ".join(
        f"{r[k]:.3f}" if k != "fd" else f"{r[k]:.1f}" for k in COLUMNS) + " |")
  return head + "\n".join(lines) + "\n"
