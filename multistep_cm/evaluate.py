"""Quality-vs-steps report of trained runs: `python -m multistep_cm.evaluate --workdir=DIR`.

    python -m multistep_cm.evaluate --workdir=/tmp/mcm_digits --steps=1,2,4,8,16,64,512

`--workdir` is one run or a directory of runs (a staged pipeline's root). A diffusion
run is sampled with each of `--samplers` (DDIM, aDDIM, Euler, Heun) on each `--spacing`
grid at each of `--steps` (rows state NFE: Heun's K steps cost 2K - 1); a
Multistep CM run with its own student step count S (when S is in `--steps`, or always
if `--steps` is empty); a student trained on a range of guidance scales is told each w
of `--guidance` (a row each). Every row uses the same seed, so the noise is shared.

The metric follows the data (evaluation/sample_metrics.py): the digits classifier's
FD / accuracy / label entropy, the mixture's energy distance, or FID / IS with the FID
Inception network (`--inception_weights`, `--reference_stats`). The table, written as
markdown and JSON (`<output>.md`, `<output>.json`; default `<workdir>/eval_<weights>`),
names the weights used, the checkpoint step, the number of samples, the network and
the reference statistics. Beside it, `<output>.png` plots the primary metric against NFE
(a line per diffusion sampler, a point per student), and the same figure goes to
TensorBoard as image `quality_vs_nfe` of a run named after the output (`<output>/`).
"""
import json
import os

from absl import app
from absl import flags
import numpy as np

_WORKDIR = flags.DEFINE_string("workdir", None, "A run, or a directory of runs.")
_STEPS = flags.DEFINE_list("steps", ["1", "2", "4", "8", "16", "64", "512"],
                           "Step counts: diffusion runs are sampled at each; students whose S "
                           "is listed are evaluated.")
_SAMPLERS = flags.DEFINE_list("samplers", ["ddim", "addim"], "Samplers for diffusion runs: "
                              "ddim, addim, euler, heun (Heun's K steps: 2K - 1 NFE).")
_SPACING = flags.DEFINE_list("spacing", ["uniform"], "Diffusion runs: time grids, uniform "
                             "(in t) and/or karras (EDM's sigma spacing).")
_FINAL_STEP = flags.DEFINE_enum("final_step", None, ["addim", "ddim"], "aDDIM's last step to "
                                "t = 0 (default: sampling.DEFAULT_FINAL_STEP).")
_GUIDANCE = flags.DEFINE_list("guidance", [], "Students trained on a guidance range: a row "
                              "per w told (default the range's lower end); others ignore it.")
_NUM = flags.DEFINE_integer("num_samples", 2000, "Samples per row.")
_SEED = flags.DEFINE_integer("seed", 0, "Noise seed (shared by all rows).")
_WEIGHTS = flags.DEFINE_string("weights", "ema0", "'params' (raw) or an EMA ('ema0', ...).")
_METRIC = flags.DEFINE_enum("metric", "auto", ["auto", "digits", "prompts", "energy", "fid"],
                             "Metric (auto: the dataset's, sample_metrics.py).")
_INCEPTION = flags.DEFINE_string("inception_weights", "", "FID: converted Inception .npz.")
_REFERENCE = flags.DEFINE_string("reference_stats", "", "FID: reference statistics .npz.")
_BATCH = flags.DEFINE_integer("batch_size", 500, "Global batch per sampling call.")
_OUTPUT = flags.DEFINE_string("output", None, "Output prefix (default <workdir>/eval_<weights>).")
flags.mark_flags_as_required(["workdir"])


def main(argv):
  del argv
  import jax  # pylint: disable=g-import-not-at-top
  from multistep_cm.evaluation import report  # pylint: disable=g-import-not-at-top
  rows, header = report.evaluate_runs(_WORKDIR.value, _STEPS.value, _SAMPLERS.value, _NUM.value,
                               _SEED.value, _WEIGHTS.value, _METRIC.value, _INCEPTION.value,
                               _REFERENCE.value, _BATCH.value, spacings=_SPACING.value,
                               final_step=_FINAL_STEP.value, guidance=_GUIDANCE.value)
  if jax.process_index() != 0:
    return
  prefix = _OUTPUT.value or os.path.join(_WORKDIR.value, f"eval_{_WEIGHTS.value}")
  markdown = report.to_markdown(rows, header)
  with open(prefix + ".md", "w") as fh:
    fh.write(markdown)
  with open(prefix + ".json", "w") as fh:
    json.dump({"header": header, "rows": rows}, fh, indent=2,
              default=lambda o: o.item() if isinstance(o, np.generic) else str(o))
  report.write_figure(rows, header, prefix)
  print(markdown)
  print(f"wrote {prefix}.md, {prefix}.json, {prefix}.png (quality against NFE) and its "
        f"TensorBoard events in {prefix}/")


if __name__ == "__main__":
  app.run(main)
