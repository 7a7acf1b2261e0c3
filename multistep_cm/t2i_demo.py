"""The embedded text-to-image demo's report: do teacher and students draw what the prompt says?

    python -m multistep_cm.main --config=configs/digits_t2i.py --workdir=/tmp/mcm_t2i
    python -m multistep_cm.t2i_demo --workdir=/tmp/mcm_t2i

`--workdir` is the root of configs/digits_t2i.py's staged run: a text-conditioned diffusion
teacher (`teacher/`) and Multistep CD students (`cd_w0/`, `cd_w1/`, ...), each distilled
from the teacher guided at its own w (config.loss.guidance_scale). Prompts are the captions
of the held-out test digits (data/captions.py, every property named), encoded by the
fixed encoder the runs were trained with. Rows:
  * the teacher with its own sampler (aDDIM, `--teacher_steps`) and classifier-free guidance
    at each w of `--guidance` (NFE counts the guided pair as one batch, as sampling runs it);
  * each student with its S steps and no guidance of its own: it learned the guided teacher.
Columns: the prompt metric (evaluation/prompt_metric.py): digit accuracy (the digits
classifier against the named digit), thickness / width / slant accuracy (measured as the
captions were; chance 0.5), prompt accuracy (digit and all properties right) and the
digits FD to the test split. Every row uses the same prompts and noise seed. Writes
`<output>.md`, `<output>.json` and `<output>.png`: a grid with the prompts beside the
rows, for each of `--grid_prompts` prompts a teacher row and a student row at the largest w.
"""
import json
import os

from absl import app
from absl import flags
import numpy as np

_WORKDIR = flags.DEFINE_string("workdir", None, "Root of a configs/digits_t2i.py run.")
_NUM = flags.DEFINE_integer("num_prompts", 1000, "Prompts (one sample each) per row.")
_GUIDANCE = flags.DEFINE_list("guidance", ["0", "1", "3"], "Teacher guidance scales w.")
_TEACHER_STEPS = flags.DEFINE_integer("teacher_steps", 0, "Teacher sampler steps (0: the "
                                      "teacher run's own sample_steps).")
_SEED = flags.DEFINE_integer("seed", 0, "Prompt draw and noise seed.")
_GRID_PROMPTS = flags.DEFINE_integer("grid_prompts", 6, "Prompts in the picture.")
_GRID_COLS = flags.DEFINE_integer("grid_samples", 8, "Samples per prompt in the picture.")
_WEIGHTS = flags.DEFINE_string("weights", "ema0", "'params' (raw) or an EMA ('ema0', ...).")
_OUTPUT = flags.DEFINE_string("output", None, "Output prefix (default <workdir>/t2i_demo).")
flags.mark_flags_as_required(["workdir"])

COLUMNS = ("digit_accuracy", "thickness_accuracy", "width_accuracy", "slant_accuracy",
           "prompt_accuracy", "fd")


def evaluate(root: str, num: int, scales, teacher_steps: int = 0, seed: int = 0,
             weights: str = "ema0", grid_prompts: int = 6, grid_cols: int = 8):
  """`(rows, picture)`: one row per (model, w) with the prompt metric, and the grid."""
  from multistep_cm import generation  # pylint: disable=g-import-not-at-top
  from multistep_cm import images  # pylint: disable=g-import-not-at-top
  from multistep_cm import prompts  # pylint: disable=g-import-not-at-top
  from multistep_cm import runs  # pylint: disable=g-import-not-at-top
  from multistep_cm.evaluation import sample_metrics  # pylint: disable=g-import-not-at-top

  paths = runs.find_runs(root)
  loaded = [runs.load_run(p, weights) for p in paths]
  teachers = [r for r in loaded if r.mode == "diffusion"]
  students = sorted((r for r in loaded if r.mode != "diffusion"),
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


def main(argv):
  del argv
  from multistep_cm import images  # pylint: disable=g-import-not-at-top
  scales = [float(w) for w in _GUIDANCE.value]
  rows, picture = evaluate(_WORKDIR.value, _NUM.value, scales, _TEACHER_STEPS.value,
                           _SEED.value, _WEIGHTS.value, _GRID_PROMPTS.value, _GRID_COLS.value)
  prefix = _OUTPUT.value or os.path.join(_WORKDIR.value, "t2i_demo")
  markdown = to_markdown(rows)
  with open(prefix + ".md", "w") as fh:
    fh.write(markdown)
  with open(prefix + ".json", "w") as fh:
    json.dump({"num_prompts": _NUM.value, "seed": _SEED.value, "weights": _WEIGHTS.value,
               "rows": rows}, fh, indent=2)
  images.save_png(picture, prefix + ".png")
  print(markdown)
  print(f"wrote {prefix}.md, {prefix}.json and {prefix}.png")


if __name__ == "__main__":
  app.run(main)
