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
Inception network (`--inception_weights`, `--reference_stats`). `--metric` also takes
`fd_dinov2` (FD in DINOv2 features, `--dinov2_weights` and DINOv2 reference statistics),
`prdc` (precision, recall, density, coverage in the features of a reference file that
keeps its rows), several at once (`--metric=fid,fd_dinov2,prdc`, `--reference_stats` a
file of each network), `clip` (text-conditioned runs: the CLIP score of each sample and
its caption, `--clip_weights`, `--clip_tokenizer`), `folder` (FD in the features of a CNN
trained on the run's own data, to its held-out split: evaluation/folder_metric.py, what
`auto` picks for a `folder:` dataset), or `none`: sampling alone, each row's
cost (NFE, seconds) in the table and its samples as a grid `<output>_<run>_<sampler>.png`,
no figure. The table, written as
markdown and JSON (`<output>.md`, `<output>.json`; default `<workdir>/eval_<weights>`),
names the weights used, the checkpoint step, the number of samples, the network and
the reference statistics. Beside it, `<output>.png` plots the primary metric against NFE
(a line per diffusion sampler, a point per student), and the same figure goes to
TensorBoard as image `quality_vs_nfe` of a run named after the output (`<output>/`).

`--checkpoints=every:K|all|S1,S2,...` scores several checkpoints of each run instead of its
latest (evaluation/checkpoint_curve.py): every:K those whose step is a multiple of K and
the latest, each at the rows above. The record (`<output>.json`, `.md`; default
`<workdir>/eval_checkpoints/<weights>`) is extended, not replaced: a checkpoint's row
already in it is not sampled again, so a repeated or interrupted call resumes.
`<output>.png` plots the primary metric against training step, and each run's numbers go
to TensorBoard on its own step axis in `<run>/eval_checkpoints/<output's name>/`.

Every bad input is one line `evaluate: error: ...` naming the flag, checked before anything
is sampled, and an exit status of docs/operations.md's table: 2 a bad flag (a workdir that
does not exist or holds no run, weights a run does not have, a step count, sampler,
spacing or guidance that is not one, a count that is not positive, choices that leave no
row to report, a `--checkpoints` that is not one or names a step a run has no checkpoint
of, a record at `--output` of other settings); 4 a checkpoint that cannot be read; 6 an output that cannot be written.
"""
import json
import os
import sys

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
_METRIC = flags.DEFINE_list("metric", ["auto"], "Metric, or several comma-separated: auto "
                            "(the dataset's, sample_metrics.py), digits, prompts, energy, fid, "
                            "fd_dinov2, prdc, clip, folder; or none (samples, grids and costs "
                            "only).")
_INCEPTION = flags.DEFINE_string("inception_weights", "", "FID: converted Inception .npz.")
_DINOV2 = flags.DEFINE_string("dinov2_weights", "", "FD-DINOv2: converted DINOv2 .npz.")
_CLIP = flags.DEFINE_string("clip_weights", "", "CLIP score: converted CLIP .npz.")
_CLIP_TOKENIZER = flags.DEFINE_list("clip_tokenizer", [], "CLIP score: merges.txt and "
                                    "vocab.json, or OpenAI's bpe_simple_vocab_16e6.txt.gz.")
_REFERENCE = flags.DEFINE_list("reference_stats", [], "FID / FD-DINOv2 / prdc: reference "
                               "statistics .npz, one per feature network.")
_BATCH = flags.DEFINE_integer("batch_size", 500, "Global batch per sampling call.")
_OUTPUT = flags.DEFINE_string("output", None, "Output prefix (default <workdir>/eval_<weights>; "
                              "with --checkpoints <workdir>/eval_checkpoints/<weights>).")
_CHECKPOINTS = flags.DEFINE_string("checkpoints", None, "Score several checkpoints of each "
                                   "run: every:K (steps that are multiples of K, and the "
                                   "latest), all, or steps S1,S2,...; default: the latest.")
flags.mark_flags_as_required(["workdir"])


def fail(code: int, message: str):
  """One line `evaluate: error: ...` on stderr and exit `code`."""
  print(f"evaluate: error: {message}", file=sys.stderr)
  sys.exit(code)


def parse_flags(argv):
  """absl's parsing, but a flag it cannot parse, an unknown or a missing one is one line
  and exit 2."""
  try:
    return flags.FLAGS(argv)
  except flags.Error as e:
    fail(2, (str(e).splitlines() or [type(e).__name__])[0])


def check_flags(runs, sampling):
  """Raises runs.InputError on a flag whose values are not what it takes."""
  for flag, values, allowed in (("samplers", _SAMPLERS.value, sampling.SAMPLERS),
                                ("spacing", _SPACING.value, sampling.SPACINGS)):
    bad = [v for v in values if v not in allowed]
    if bad or not values:
      raise runs.InputError(f"--{flag}={','.join(values)}: {bad or 'nothing'} is not one of "
                            f"{list(allowed)}")
  bad = [s for s in _STEPS.value if not (s.strip().isdigit() and int(s) > 0)]
  if bad:
    raise runs.InputError(f"--steps={','.join(_STEPS.value)}: {bad} are not step counts "
                          "(positive integers, comma-separated)")
  for w in _GUIDANCE.value:
    try:
      float(w)
    except ValueError:
      raise runs.InputError(f"--guidance={','.join(_GUIDANCE.value)}: {w!r} is not a "
                            "number") from None
  if _CHECKPOINTS.value is not None:
    from multistep_cm.evaluation import checkpoint_curve  # pylint: disable=g-import-not-at-top
    checkpoint_curve.parse_selection(_CHECKPOINTS.value)
  runs.positive("num_samples", _NUM.value)
  runs.positive("batch_size", _BATCH.value)
  from multistep_cm.evaluation import sample_metrics  # pylint: disable=g-import-not-at-top
  bad = [m for m in _METRIC.value if m not in sample_metrics.KINDS]
  if bad or not _METRIC.value or ("none" in _METRIC.value and len(_METRIC.value) > 1):
    raise runs.InputError(f"--metric={','.join(_METRIC.value)}: "
                          + (f"{bad} not among {list(sample_metrics.KINDS)}" if bad
                             else "none stands alone" if _METRIC.value else "nothing given"))


def main(argv):
  if len(argv) > 1:
    fail(2, f"unexpected arguments {argv[1:]} (flags are --name=value)")
  import jax  # pylint: disable=g-import-not-at-top
  from multistep_cm.diffusion import sampling  # pylint: disable=g-import-not-at-top
  from multistep_cm.evaluation import report  # pylint: disable=g-import-not-at-top
  from multistep_cm.runtime import checkpointing  # pylint: disable=g-import-not-at-top
  from multistep_cm.sampling import runs  # pylint: disable=g-import-not-at-top
  checkpointing.quiet_orbax_logs()
  curve = _CHECKPOINTS.value is not None
  prefix = _OUTPUT.value or (os.path.join(_WORKDIR.value, "eval_checkpoints", _WEIGHTS.value)
                             if curve else os.path.join(_WORKDIR.value, f"eval_{_WEIGHTS.value}"))
  try:  # every input, before anything is sampled
    check_flags(runs, sampling)
    runs.check_run(_WORKDIR.value, _WEIGHTS.value, root_ok=True)
    runs.check_writable(os.path.dirname(os.path.abspath(prefix)),
                        "--output" if _OUTPUT.value else "--workdir (the default --output)")
    if curve:
      return _checkpoint_curve(prefix)
    rows, header = report.evaluate_runs(
        _WORKDIR.value, _STEPS.value, _SAMPLERS.value, _NUM.value, _SEED.value, _WEIGHTS.value,
        _METRIC.value, _INCEPTION.value, ",".join(_REFERENCE.value), _BATCH.value,
        spacings=_SPACING.value, final_step=_FINAL_STEP.value, guidance=_GUIDANCE.value,
        dinov2_weights=_DINOV2.value, grid_prefix=prefix if _METRIC.value == ["none"] else None,
        clip_weights=_CLIP.value, clip_tokenizer=",".join(_CLIP_TOKENIZER.value))
  except runs.InputError as e:
    fail(e.code, str(e))
  except checkpointing.CheckpointError as e:
    fail(4, str(e))
  if jax.process_index() != 0:
    return
  markdown = report.to_markdown(rows, header)
  with open(prefix + ".md", "w") as fh:
    fh.write(markdown)
  with open(prefix + ".json", "w") as fh:
    json.dump({"header": header, "rows": rows}, fh, indent=2,
              default=lambda o: o.item() if isinstance(o, np.generic) else str(o))
  print(markdown)
  if header["primary"] is None:
    print(f"wrote {prefix}.md, {prefix}.json and a grid per row, {prefix}_<run>_<sampler>.png")
    return
  report.write_figure(rows, header, prefix)
  print(f"wrote {prefix}.md, {prefix}.json, {prefix}.png (quality against NFE) and its "
        f"TensorBoard events in {prefix}/")


def _checkpoint_curve(prefix: str):
  """`--checkpoints`: each selected checkpoint scored (evaluation/checkpoint_curve.py)."""
  import jax  # pylint: disable=g-import-not-at-top
  from multistep_cm.evaluation import checkpoint_curve  # pylint: disable=g-import-not-at-top
  rows, header, scored = checkpoint_curve.evaluate_checkpoints(
      _WORKDIR.value, checkpoint_curve.parse_selection(_CHECKPOINTS.value), _STEPS.value,
      _SAMPLERS.value, _NUM.value, _SEED.value, _WEIGHTS.value, prefix,
      metric_kind=_METRIC.value, batch_size=_BATCH.value, spacings=_SPACING.value,
      final_step=_FINAL_STEP.value, guidance=_GUIDANCE.value,
      inception_weights=_INCEPTION.value, reference_stats=",".join(_REFERENCE.value),
      dinov2_weights=_DINOV2.value, clip_weights=_CLIP.value,
      clip_tokenizer=",".join(_CLIP_TOKENIZER.value))
  if jax.process_index() != 0:
    return
  markdown = checkpoint_curve.to_markdown(rows, header)
  with open(prefix + ".md", "w") as fh:
    fh.write(markdown)
  checkpoint_curve.write_json(prefix + ".json", header, rows)
  print(markdown)
  print(f"scored {scored} new row(s); {len(rows) - scored} were already in {prefix}.json")
  if header["primary"] is not None:
    checkpoint_curve.curve_figure(rows, header).savefig(prefix + ".png")
  events = checkpoint_curve.events_dir("<run>", prefix)
  print(f"wrote {prefix}.md, {prefix}.json"
        + (f", {prefix}.png (the metric against training step)" if header["primary"] else "")
        + f" and TensorBoard scalars in {events}/ of each run")


if __name__ == "__main__":
  app.run(main, flags_parser=parse_flags)
