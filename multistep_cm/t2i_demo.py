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
The work is evaluation/t2i_report.py's (importable without this command's flags).

A flag it cannot run is one line `t2i_demo: error: ...` before anything is sampled: exit 2
(a bad value, a `--workdir` that is not such a root), 4 (a checkpoint that cannot be read),
6 (an `--output` that cannot be written).
"""
import json
import os

from absl import app
from absl import flags

from multistep_cm.sampling import inputs

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


def check_inputs() -> tuple[list[float], str]:
  """The guidance scales and the output prefix of the flags; raises inputs.InputError (one
  line naming the flag) for any flag that cannot be run, before anything is sampled."""
  scales = inputs.numbers("guidance", _GUIDANCE.value, float, minimum=0)
  for flag in ("num_prompts", "grid_prompts", "grid_samples"):
    inputs.positive(flag, flags.FLAGS[flag].value)
  if _TEACHER_STEPS.value < 0:
    raise inputs.InputError(f"--teacher_steps must be 0 (the teacher's own) or positive, got "
                            f"{_TEACHER_STEPS.value}")
  from multistep_cm.sampling import runs  # pylint: disable=g-import-not-at-top
  runs.check_run(_WORKDIR.value, _WEIGHTS.value, root_ok=True)
  prefix = _OUTPUT.value or os.path.join(_WORKDIR.value, "t2i_demo")
  inputs.check_writable(os.path.dirname(os.path.abspath(prefix)), "--output")
  return scales, prefix


def main(argv):
  del argv  # flags only (inputs.flags_parser)
  # A root that is not a digits_t2i run, or a w it cannot take, is a ValueError.
  with inputs.refusals("t2i_demo"):
    scales, prefix = check_inputs()
    from multistep_cm.evaluation import t2i_report  # pylint: disable=g-import-not-at-top
    from multistep_cm.runtime import checkpointing  # pylint: disable=g-import-not-at-top
    from multistep_cm.sampling import images  # pylint: disable=g-import-not-at-top
    checkpointing.quiet_orbax_logs()
    rows, picture = t2i_report.evaluate(_WORKDIR.value, _NUM.value, scales,
                                        _TEACHER_STEPS.value, _SEED.value, _WEIGHTS.value,
                                        _GRID_PROMPTS.value, _GRID_COLS.value)
  markdown = t2i_report.to_markdown(rows)
  with open(prefix + ".md", "w") as fh:
    fh.write(markdown)
  with open(prefix + ".json", "w") as fh:
    json.dump({"num_prompts": _NUM.value, "seed": _SEED.value, "weights": _WEIGHTS.value,
               "rows": rows}, fh, indent=2)
  images.save_png(picture, prefix + ".png")
  print(markdown)
  print(f"wrote {prefix}.md, {prefix}.json and {prefix}.png")


if __name__ == "__main__":
  app.run(main, flags_parser=inputs.flags_parser("t2i_demo"))
