"""Draw samples from a trained run: `python -m multistep_cm.sample --workdir=DIR ...`.

    python -m multistep_cm.sample --workdir=/tmp/mcm_digits/cd4 --num_samples=1000 \\
        --seed=0 --output=/tmp/cd4_samples.npz

Loads the latest checkpoint's EMA weights (`--weights=params` for the raw ones), samples
sharded over every device and host, and writes `images` (uint8 [N, H, W, C]; vectors
for the toy mixture: float32 `x` [N, D]) and `labels` to the .npz, with a JSON string
`metadata` naming the run, step, weights, sampler and seed, plus a PNG grid beside it.

A Multistep CM samples with its own student step count (Algorithm 2); `--steps` may
repeat it or be omitted. A diffusion model takes `--sampler=ddim|addim|euler|heun`,
`--steps=K` and `--spacing=uniform|karras` (Heun's K steps cost 2K - 1 evaluations);
aDDIM's x_var is the analytic rule or, with `--x_var=table`, a per-t table estimated
from `--table_examples` training examples (Algorithm 3), and `--final_step=ddim|addim`
picks the solver of its last step to t = 0.

A text-conditioned run samples from prompts (`--prompts`): 'data' (default: captions of
training examples drawn with the seed), an .npz of the user's encoder outputs
(`text_embedding` [N, L, D], `text_mask` [N, L], optional `captions`), or, for the
embedded captioned digits, the prompt strings themselves separated by ';' ("a thick
seven;a thin slanted two"), encoded by the shipped encoder. Prompts are cycled to
`--num_samples`; the grid shows each prompt beside its row and the .npz keeps `captions`.

A student trained on a range of guidance scales (`loss.guidance_range`) is told
`--guidance=w` (one forward per step, no guided pair); w must lie in the range its
checkpoint records, and without `--guidance` it is the range's lower end. A choice that
does not fit the run (w outside the range, a step count it was not trained for) is
refused in one line, exit status 2.

Every bad input is one line `sample: error: ...` naming the flag, checked before anything
is sampled, and an exit status of docs/operations.md's table: 2 a bad flag (a workdir
that does not exist or is a staged root, a checkpoint step or weights it does not have,
listing what it has; a count that is not positive; a value absl cannot parse); 4 a
checkpoint that cannot be read (corrupt: the line names the earlier steps to pick);
6 an `--output` directory that cannot be written. Weights or samples that are not finite
(a damaged or diverged checkpoint) are refused with exit 4 and never written out: the line
names the checkpoint's step and the earlier complete ones.
"""
import json
import os

from absl import app
from absl import flags
from absl import logging
import numpy as np

from multistep_cm.sampling import inputs

_WORKDIR = flags.DEFINE_string("workdir", None, "The run's workdir (with config.json).")
_STEPS = flags.DEFINE_integer("steps", 0, "Sampling steps (0: the run's own: S, or "
                              "config.sample_steps for diffusion).")
_NUM = flags.DEFINE_integer("num_samples", 64, "How many samples.")
_SEED = flags.DEFINE_integer("seed", 0, "Noise (and random labels) seed.")
_OUTPUT = flags.DEFINE_string("output", None, "Output .npz (a .png grid is written beside).")
_WEIGHTS = flags.DEFINE_string("weights", "ema0", "'params' (raw) or an EMA ('ema0', ...).")
_CKPT_STEP = flags.DEFINE_integer("checkpoint_step", None, "Checkpoint step (default latest).")
# The choices of diffusion/sampling.py (SAMPLERS, SPACINGS, FINAL_STEPS), spelled out so
# that --help does not import JAX.
_SAMPLER = flags.DEFINE_enum("sampler", None, ["ddim", "addim", "euler", "heun"],
                             "Diffusion runs: sampler (default config.sample_sampler).")
_SPACING = flags.DEFINE_enum("spacing", "uniform", ["uniform", "karras"], "Diffusion runs: "
                             "time grid, uniform in t or EDM's sigma spacing (rho = 7).")
_FINAL_STEP = flags.DEFINE_enum("final_step", None, ["addim", "ddim"], "aDDIM's last step to "
                                "t = 0 (default: sampling.DEFAULT_FINAL_STEP).")
_XVAR = flags.DEFINE_enum("x_var", "analytic", ["analytic", "table"], "aDDIM x_var rule.")
_TABLE_EXAMPLES = flags.DEFINE_integer("table_examples", 2048, "Examples for --x_var=table.")
_LABELS = flags.DEFINE_string("labels", "random", "Class-conditional runs: 'random' or a "
                              "comma-separated list of class ids, cycled.")
_PROMPTS = flags.DEFINE_string("prompts", "data", "Text-conditioned runs: 'data', an .npz "
                               "of text_embedding/text_mask[/captions], or ';'-separated "
                               "prompts (captioned digits).")
_GUIDANCE = flags.DEFINE_float("guidance", None, "Classifier-free guidance scale (default "
                               "0; a student trained on a range of w: the w it is told, "
                               "default the range's lower end).")
_BATCH = flags.DEFINE_integer("batch_size", 256, "Global batch per sampling call.")
_PROGRESS = flags.DEFINE_bool("progress", True, "Show a progress bar.")
flags.mark_flags_as_required(["workdir", "output"])


def parse_labels(text: str, num: int, num_classes: int) -> np.ndarray | None:
  """`--labels`: None for random classes (or an unconditional model), else `num` class ids
  cycling through the given list."""
  if not num_classes or text == "random":
    return None
  try:
    ids = [int(v) for v in text.split(",") if v.strip()]
  except ValueError:
    ids = []
  bad = [i for i in ids if not 0 <= i < num_classes]
  if not ids or bad:
    raise ValueError(f"--labels must be 'random' or class ids in [0, {num_classes}), got "
                     f"{text!r}")
  return np.resize(np.asarray(ids, np.int32), num)


def fail(code: int, message: str):
  """One line `sample: error: ...` on stderr and exit `code`."""
  inputs.fail("sample", code, message)


def main(argv):
  del argv  # flags only (inputs.flags_parser)
  import jax  # pylint: disable=g-import-not-at-top
  from multistep_cm.runtime import checkpointing  # pylint: disable=g-import-not-at-top
  from multistep_cm.sampling import generation  # pylint: disable=g-import-not-at-top
  from multistep_cm.sampling import images  # pylint: disable=g-import-not-at-top
  from multistep_cm.sampling import runs  # pylint: disable=g-import-not-at-top
  checkpointing.quiet_orbax_logs()

  texts = None
  try:  # every input, before anything is sampled
    runs.check_run(_WORKDIR.value, _WEIGHTS.value, _CKPT_STEP.value)
    inputs.positive("num_samples", _NUM.value)
    inputs.positive("batch_size", _BATCH.value)
    if _XVAR.value == "table":
      inputs.positive("table_examples", _TABLE_EXAMPLES.value)
    inputs.check_writable(os.path.dirname(os.path.abspath(_OUTPUT.value)), "--output")
    try:
      run = runs.load_run(_WORKDIR.value, _WEIGHTS.value, _CKPT_STEP.value)
    except checkpointing.CheckpointError as e:
      hint = runs.earlier_checkpoints(_WORKDIR.value, _CKPT_STEP.value)
      raise inputs.InputError(f"{e}{hint}", code=inputs.BAD_CHECKPOINT) from None
    bad = runs.nonfinite_arrays(run.params)
    if bad:
      raise inputs.InputError(
          f"checkpoint {run.workdir} step {run.step} ({run.describe_weights()}) holds "
          f"non-finite values in {len(bad)} arrays ({', '.join(bad[:3])}); nothing sampled"
          f"{runs.earlier_checkpoints(run.workdir, run.step)}",
          code=inputs.BAD_CHECKPOINT)
    spec = run.sampler_spec(_STEPS.value, _SAMPLER.value, _XVAR.value, _GUIDANCE.value,
                           _SPACING.value, _FINAL_STEP.value)
    if getattr(run.model, "text_dim", 0):
      from multistep_cm.sampling import prompts  # pylint: disable=g-import-not-at-top
      labels, texts = prompts.parse(_PROMPTS.value, _NUM.value, run.config, _SEED.value)
    else:
      labels = parse_labels(_LABELS.value, _NUM.value, getattr(run.model, "num_classes", 0))
  except inputs.InputError as e:
    fail(e.code, str(e))
  except ValueError as e:  # a choice that does not fit the run (or a bad prompt): user input
    fail(2, str(e))
  if spec.kind == "heun" and spec.spacing == "uniform":
    # Measured in docs/results.md ("Diffusion samplers at equal NFE"): far worse than DDIM
    # at every budget on the digits teacher, where the Karras grid is the one it works on.
    logging.warning("--sampler=heun on the uniform time grid (the default --spacing) is "
                    "much worse than DDIM at few steps; Heun is EDM's sampler for its "
                    "sigma grid: add --spacing=karras")
  table = None
  if spec.kind == "addim" and spec.x_var == "table":
    data, data_labels = run.training_examples(_TABLE_EXAMPLES.value, _SEED.value)
    table = generation.estimate_table(run.model, run.params, run.schedule, data, data_labels,
                                      seed=_SEED.value, eta=float(run.config.loss.eta))
  logging.info("Sampling %d from %s (%s) with %s", _NUM.value, run.workdir,
               run.describe_weights(), spec.describe())
  samples, labels = generation.generate(
      run.model, run.params, run.schedule, spec, _NUM.value, seed=_SEED.value,
      batch_size=_BATCH.value, labels=labels, x_var_table=table, progress=_PROGRESS.value,
      decode=run.plan.decode)
  finite = np.isfinite(samples.reshape(len(samples), -1)).all(axis=1)
  if not finite.all():  # weights that overflow: never written out as images
    fail(inputs.BAD_CHECKPOINT, f"{np.sum(~finite)} of {len(samples)} samples of checkpoint "
         f"{run.workdir} step {run.step} ({run.describe_weights()}) are not finite (NaN or "
         f"inf); nothing written{runs.earlier_checkpoints(run.workdir, run.step)}")
  if jax.process_index() != 0:
    return
  metadata = {"workdir": os.path.abspath(run.workdir), "checkpoint_step": run.step,
              "weights": run.describe_weights(), "sampler": spec.describe(),
              "seed": _SEED.value, "num_samples": _NUM.value, "mode": run.mode}
  out = {"metadata": np.asarray(json.dumps(metadata))}
  if samples.ndim == 4:
    out["images"] = images.to_uint8(samples)
  else:
    out["x"] = samples.astype(np.float32)
  if texts is not None:
    out["captions"] = np.asarray(texts)
    labels = np.asarray(texts, dtype=object)  # the grid's rows: one per prompt
  else:
    out["labels"] = (labels if labels is not None
                     else np.full(len(samples), -1)).astype(np.int32)
  os.makedirs(os.path.dirname(os.path.abspath(_OUTPUT.value)), exist_ok=True)
  np.savez(_OUTPUT.value, **out)
  if samples.ndim == 4:
    png = os.path.splitext(_OUTPUT.value)[0] + ".png"
    shown = labels[:100] if labels is not None else None  # a row per class or prompt
    images.save_png(images.image_grid(samples[:100], shown,
                                      class_names=run.plan.class_names), png)
  print(f"wrote {_OUTPUT.value}: {len(samples)} samples from {run.workdir} "
        f"({run.describe_weights()}; {spec.describe()}; seed {_SEED.value})")


if __name__ == "__main__":
  app.run(main, flags_parser=inputs.flags_parser("sample"))
