"""Diffusion samplers at equal network evaluations (docs/maths.md §5.7, Fig. 3 and Fig. 5;
Euler, Heun and the Karras grid: §16).

    python -m multistep_cm.sampler_comparison --data=toy
    python -m multistep_cm.sampler_comparison --data=digits_mixture
    python -m multistep_cm.sampler_comparison --data=digits --workdir=/tmp/mcm_digits/teacher

DDIM, aDDIM (analytic x_var, its own last step), aDDIM with a DDIM last step, Euler and
Heun (EDM's, in sigma = exp(-logSNR/2)), each at NFE budgets `--nfe` on the uniform and
Karras time grids. Heun's K steps cost 2K - 1 evaluations, so at a budget n it takes
n / 2 steps and n - 1 evaluations; every row states its NFE. All rows of one seed start
from the same noise.

  * `toy`: the 8-d Gaussian mixture with its exact denoiser (no network); energy
    distance to a fresh true sample, with the spread of fresh true samples as the floor.
  * `digits_mixture`: a Gaussian mixture with one component of std `--component_std`
    per training digit, and its exact denoiser: the digits as an ideal model would
    sample them (no network); the digits classifier's FD.
  * `digits`: a trained digits diffusion run (`--workdir`, EMA weights), the digits FD.

For the digits, `border_std` is the samples' per-pixel standard deviation (root mean
variance) on the pixels that are -1 in every training digit: noise a sampler leaves on
pixels every digit has blank.

A flag it cannot run is one line `sampler_comparison: error: ...` before anything is
sampled: exit 2 (a bad value, a `--workdir` that is not a digits diffusion run), 4 (its
checkpoint cannot be read), 6 (a `--json` that cannot be written).
"""
import json
import time

from absl import app
from absl import flags
from absl import logging

from multistep_cm.sampling import inputs

_DATA = flags.DEFINE_enum("data", "toy", ["toy", "digits_mixture", "digits"], "What to sample.")
_WORKDIR = flags.DEFINE_string("workdir", None, "--data=digits: the diffusion run.")
_NFE = flags.DEFINE_list("nfe", ["4", "8", "16", "32", "64"], "NFE budgets.")
_SAMPLERS = flags.DEFINE_list("samplers", ["ddim", "addim", "addim_ddim_last", "euler", "heun"],
                              "Samplers; addim_ddim_last is aDDIM with a DDIM last step.")
_SPACINGS = flags.DEFINE_list("spacings", ["uniform", "karras"], "Time grids.")
_NUM = flags.DEFINE_integer("num_samples", 2000, "Samples per row.")
_SEEDS = flags.DEFINE_list("seeds", ["0"], "Noise seeds (a row per seed).")
_COMPONENT_STD = flags.DEFINE_float("component_std", 0.01, "--data=digits_mixture: the std "
                                    "of each training digit's component.")
_BATCH = flags.DEFINE_integer("batch_size", 500, "Samples per sampling call.")
_JSON = flags.DEFINE_string("json", None, "Also write the rows here.")

# The time grids of diffusion/sampling.py (SPACINGS), spelled out so that a bad flag is
# refused without importing JAX.
SPACINGS = ("uniform", "karras")
# name -> (sampler, aDDIM's final step)
VARIANTS = {"ddim": ("ddim", None), "addim": ("addim", "addim"),
            "addim_ddim_last": ("addim", "ddim"), "euler": ("euler", None),
            "heun": ("heun", None)}


def steps_for_budget(sampler: str, nfe: int) -> int:
  """The step count that spends at most `nfe` evaluations (Heun: 2K - 1 <= nfe)."""
  return max(1, (nfe + 1) // 2) if sampler == "heun" else nfe


def border_std(samples, train_images) -> float:
  """Root mean variance of the samples over the pixels that are -1 in every training image."""
  import numpy as np  # pylint: disable=g-import-not-at-top
  blank = np.all(train_images <= -1.0, axis=0)
  if not blank.any():
    return float("nan")
  return float(np.sqrt(np.mean(np.var(samples[:, blank], axis=0))))


def _exact_sampler(mix, schedule, shape, num_samples, batch_size):
  """`draw(spec, seed) -> samples`: the samplers with a mixture's exact denoiser."""
  import jax  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top
  from multistep_cm.diffusion import sampling  # pylint: disable=g-import-not-at-top

  def denoise(z, t):
    return mix.denoise(z.reshape(z.shape[0], -1), t, schedule).reshape(z.shape)

  def draw(spec, seed):
    fn = jax.jit(lambda z: sampling.sample(denoise, z, schedule, spec.steps, spec.kind,
                                           spacing=spec.spacing, final_step=spec.final_step))
    key = jax.random.PRNGKey(seed)
    out = []
    for b in range(0, num_samples, batch_size):
      z = jax.random.normal(jax.random.fold_in(key, b), (batch_size,) + shape)
      out.append(np.asarray(fn(z)))
    return np.concatenate(out)[:num_samples]

  return draw


def setup(data: str, workdir: str | None, num_samples: int, batch_size: int,
          component_std: float):
  """`(draw(spec, seed) -> samples, metric(samples) -> dict, description)` for `data`."""
  import jax  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top
  from multistep_cm.config import base as config_base  # pylint: disable=g-import-not-at-top
  from multistep_cm.config import build as config_build  # pylint: disable=g-import-not-at-top
  from multistep_cm.data import digits  # pylint: disable=g-import-not-at-top
  from multistep_cm.data import mixture  # pylint: disable=g-import-not-at-top
  from multistep_cm.evaluation import energy  # pylint: disable=g-import-not-at-top
  from multistep_cm.evaluation import sample_metrics  # pylint: disable=g-import-not-at-top

  if data == "toy":
    config = config_base.mixture_config("diffusion")
    mix = mixture.default_mixture(dim=int(config.data.data_dim), seed=int(config.seed))
    truth = np.asarray(mix.sample(jax.random.PRNGKey(2**20 + 1), 10_000)[0])
    floor = [energy.energy_distance(mix.sample(jax.random.PRNGKey(2**21 + i), num_samples)[0],
                                    truth) for i in range(5)]
    draw = _exact_sampler(mix, config_build.get_schedule(config), (mix.dim,), num_samples,
                          batch_size)
    metric = lambda x: {"energy_distance": energy.energy_distance(x, truth)}
    return draw, metric, {
        "data": f"{mix.dim}-d Gaussian mixture, exact denoiser",
        "metric": "energy distance to 10000 fresh true samples",
        "floor": f"fresh true samples of {num_samples}: mean {np.mean(floor):.5f}, max "
                 f"{np.max(floor):.5f}"}

  if data == "digits_mixture":
    config = config_base.digits_config("diffusion")
  else:
    if not workdir:
      raise ValueError("--data=digits needs --workdir (a digits diffusion run)")
    from multistep_cm.sampling import generation  # pylint: disable=g-import-not-at-top
    from multistep_cm.sampling import runs  # pylint: disable=g-import-not-at-top
    run = runs.load_run(workdir)
    config = run.config
    if config.data.dataset != "digits" or run.student_steps is not None:
      raise ValueError(f"--workdir must be a digits diffusion run, got {workdir!r}")
  size = int(config.data.image_size)
  train, _ = digits.load_digits("train", size)
  digits_metric = sample_metrics.make_metric(config, "digits")
  metric = lambda x: {**digits_metric(x), "border_std": border_std(x, train)}
  if data == "digits_mixture":
    flat = train.reshape(len(train), -1)
    mix = mixture.GaussianMixture(
        means=flat, stds=np.full(len(flat), component_std, np.float32),
        weights=np.full(len(flat), 1.0 / len(flat)))
    draw = _exact_sampler(mix, config_build.get_schedule(config), train.shape[1:], num_samples,
                          batch_size)
    return draw, metric, {
        "data": f"mixture of the {len(flat)} training digits ({size}x{size}), component std "
                f"{component_std}, exact denoiser",
        "metric": digits_metric.description}

  def draw_run(spec, seed):
    samples, _ = generation.generate(run.model, run.params, run.schedule, spec, num_samples,
                                     seed=seed, batch_size=batch_size)
    return samples

  return draw_run, metric, {"data": f"{workdir} ({run.describe_weights()})",
                            "metric": digits_metric.description}


def check_inputs() -> tuple[list[int], list[int]]:
  """The budgets and seeds of the flags; raises inputs.InputError (one line naming the flag)
  for any flag that cannot be run, before anything is sampled."""
  budgets = inputs.numbers("nfe", _NFE.value, int, minimum=1)
  seeds = inputs.numbers("seeds", _SEEDS.value, int, minimum=0)
  for flag, given, allowed in (("samplers", _SAMPLERS.value, sorted(VARIANTS)),
                               ("spacings", _SPACINGS.value, list(SPACINGS))):
    unknown = [v for v in given if v not in allowed]
    if unknown or not given:
      raise inputs.InputError(f"--{flag}={','.join(given)}: each must be one of {allowed}, "
                              f"got {unknown or 'nothing'}")
  inputs.positive("num_samples", _NUM.value)
  inputs.positive("batch_size", _BATCH.value)
  if not _COMPONENT_STD.value > 0:
    raise inputs.InputError(f"--component_std must be positive, got {_COMPONENT_STD.value}")
  if _DATA.value == "digits":
    if not _WORKDIR.value:
      raise inputs.InputError("--data=digits needs --workdir (a digits diffusion run)")
    from multistep_cm.sampling import runs  # pylint: disable=g-import-not-at-top
    runs.check_run(_WORKDIR.value, "ema0")
  inputs.check_output_file(_JSON.value, "--json")
  return budgets, seeds


def main(argv):
  del argv  # flags only (inputs.flags_parser)
  with inputs.refusals("sampler_comparison"):  # ValueError: not a digits diffusion run
    budgets, seeds = check_inputs()
    from multistep_cm.runtime import checkpointing  # pylint: disable=g-import-not-at-top
    from multistep_cm.sampling import generation  # pylint: disable=g-import-not-at-top
    checkpointing.quiet_orbax_logs()
    draw, metric, header = setup(_DATA.value, _WORKDIR.value, _NUM.value, _BATCH.value,
                                 _COMPONENT_STD.value)
  primary = "energy_distance" if _DATA.value == "toy" else "fd"
  rows = []
  for seed in seeds:
    for spacing in _SPACINGS.value:
      for name in _SAMPLERS.value:
        kind, final_step = VARIANTS[name]
        for budget in budgets:
          spec = generation.SamplerSpec(kind, steps_for_budget(kind, budget), spacing=spacing,
                                        final_step=final_step)
          start = time.time()
          values = metric(draw(spec, seed))
          row = {"seed": seed, "spacing": spacing, "sampler": name, "budget": budget,
                 "steps": spec.steps, "nfe": spec.nfe, **{k: v for k, v in values.items()
                                     if isinstance(v, (int, float))}}
          rows.append(row)
          logging.info("%s (%.0f s): %s", spec.describe(), time.time() - start, row)
          print(json.dumps(row), flush=True)
  print(to_markdown(rows, primary, header))
  if _JSON.value:
    with open(_JSON.value, "w") as fh:
      json.dump({"header": header, "rows": rows}, fh, indent=2)


def to_markdown(rows, primary: str, header) -> str:
  """A table per spacing: a row per sampler, a column per budget, the primary metric (mean
  over seeds, and min-max when there are several) with its NFE."""
  import numpy as np  # pylint: disable=g-import-not-at-top
  lines = [f"{header['data']}; {header['metric']}"
           + (f"; floor: {header['floor']}" if "floor" in header else "") + "."]
  extra = "border_std" if any("border_std" in r for r in rows) else None
  for spacing in dict.fromkeys(r["spacing"] for r in rows):
    budgets = sorted({r["budget"] for r in rows})
    lines += ["", f"{spacing} spacing, {primary}" + (f" [{extra}]" if extra else "") + ":", "",
              "| sampler | " + " | ".join(f"NFE {b}" for b in budgets) + " |",
              "|---|" + "---|" * len(budgets)]
    for name in dict.fromkeys(r["sampler"] for r in rows):
      cells = []
      for b in budgets:
        mine = [r for r in rows if (r["spacing"], r["sampler"], r["budget"]) == (spacing, name, b)]
        if not mine:
          cells.append("")
          continue
        v = np.array([r[primary] for r in mine])
        text = f"{v.mean():.4g}" + (f" ({v.min():.4g}-{v.max():.4g})" if len(v) > 1 else "")
        if extra:
          text += f" [{np.mean([r[extra] for r in mine]):.3f}]"
        if mine[0]["nfe"] != b:
          text += f" (NFE {mine[0]['nfe']})"
        cells.append(text)
      lines.append(f"| {name} | " + " | ".join(cells) + " |")
  return "\n".join(lines) + "\n"


if __name__ == "__main__":
  app.run(main, flags_parser=inputs.flags_parser("sampler_comparison"))
