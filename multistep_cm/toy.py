"""The toy experiment: Multistep CMs on a Gaussian mixture whose exact denoiser is the teacher.

    python -m multistep_cm.toy [--student_steps=1,2,4,8] [--modes=cd,ct,direct] [--json=FILE]

1. Pretrain a small MLP as a diffusion model on mixture samples (the v-loss), as
   the paper initialises every student from the diffusion model (§7.1).
2. From that initialisation, for each mode and student step count S:
   * `cd`: distil the exact denoiser E[x | z_t] with the aDDIM teacher step (§3, §5.5),
     or with DDIM's (`--teacher_solver=ddim`, the paper's Table 4 comparison);
   * `ct`: consistency training from samples (x_teacher = x);
   * `direct`: Direct CM (§10): regress onto the teacher's full DDIM solve from t
     to the segment start.
   * `pd`: Progressive Distillation (the paper's baseline, Table 3): halvings from a
     `--pd_start`-step exact teacher, `--train_steps` steps each, the first student
     from the pretrained MLP, each next one from (and distilling) the one before;
     evaluated at each S it passes; the teacher's two steps are `--teacher_solver`'s.
     `--equal_compute` trains the other modes' S-step students as many steps as the
     PD chain takes to reach S.
3. Report, per mode and S, the energy distance of S-step samples to the true
   mixture and to the teacher's 512-step aDDIM sampler, and the ODE error: the RMS
   distance to the teacher's 512-step DDIM solve (the probability-flow ODE) from the
   same noise. Reference rows give the teacher's own samplers and the noise floor
   (independent true samples).

Every model is trained with the main trainer's loss and step
(`train_step.make_loss_fn`, `train_step.make_train_step`) from a mixture config
(`config_base.mixture_config`), with fresh mixture samples drawn inside each compiled
chunk of steps. Beyond the paper (any-step training and segment boundaries):
`--anystep=segment_start|steps|none` also trains one any-step model per mode over all
the S values (as many steps in total as the separate models together) and samples it at
each S; `--boundaries=logsnr|karras` moves the segment boundaries.

Everything runs on the CPU in a few minutes; the tables of docs/results.md come from these commands.
A flag it cannot run is one line `toy: error: ...` and exit 2 before anything is trained (a
`--json` that cannot be written: 6; a training loss that turns non-finite: 5).
"""
import dataclasses
import json
import time
from typing import Sequence

from absl import app
from absl import flags
import jax
import jax.numpy as jnp
import numpy as np

from multistep_cm.config import base as config_base
from multistep_cm.config import build as config_build
from multistep_cm.config import checks as config_checks
from multistep_cm.config import plan as plan_lib
from multistep_cm.data import mixture as mixture_lib
from multistep_cm.diffusion import losses
from multistep_cm.diffusion import sampling
from multistep_cm.diffusion import segments
from multistep_cm.evaluation import energy
from multistep_cm.models import denoiser
from multistep_cm.models import partitioning
from multistep_cm.sampling import generation
from multistep_cm.sampling import inputs
from multistep_cm.training import optim
from multistep_cm.training import step as train_step

_STUDENT_STEPS = flags.DEFINE_list("student_steps", ["1", "2", "4", "8"], "Student step counts S.")
_MODES = flags.DEFINE_list("modes", ["cd", "ct", "direct"], "Training modes.")
_PRETRAIN_STEPS = flags.DEFINE_integer("pretrain_steps", 4000, "Diffusion pretraining steps.")
_TRAIN_STEPS = flags.DEFINE_integer("train_steps", 3000, "Steps per student.")
_BATCH = flags.DEFINE_integer("batch", 256, "Batch size.")
_NUM_EVAL = flags.DEFINE_integer("num_eval", 10_000, "Samples per evaluation.")
_HUBER = flags.DEFINE_float("huber_epsilon", 1e-4, "Pseudo-Huber epsilon (§3.6).")
_WEIGHTING = flags.DEFINE_enum("weighting", "snr_plus_one", list(losses.WEIGHTINGS),
                               "Loss weighting (§3.6; docs/design.md#losses).")
_BOUNDARIES = flags.DEFINE_enum("boundaries", "uniform", list(segments.KINDS),
                                "Segment boundaries (diffusion/segments.py).")
_ANYSTEP = flags.DEFINE_enum("anystep", "", ["", "steps", "segment_start", "none"],
                             "Also train one any-step model per mode, told its segment layout "
                             "this way ('none': not told; the grids are nested, the ablation).")
_ANYSTEP_PROBS = flags.DEFINE_list("anystep_probs", [], "With --anystep: each S's share of the "
                                    "batch, in --student_steps order (default: equal).")
_SKIP_SEPARATE = flags.DEFINE_bool("skip_separate", False, "With --anystep: only the any-step "
                                   "models.")
_TEACHER_SOLVER = flags.DEFINE_enum("teacher_solver", "addim", list(losses.TEACHER_SOLVERS),
                                     "CD's teacher step (aDDIM, the paper's; DDIM: Table 4).")
_PD_START = flags.DEFINE_integer("pd_start", 64, "PD: the exact teacher's steps in the first "
                                 "halving (a power of two times each S).")
_EQUAL_COMPUTE = flags.DEFINE_bool("equal_compute", False, "Train each S-step student of the "
                                   "other modes as many steps as PD's halvings to S together.")
_SEED = flags.DEFINE_integer("seed", 0, "Random seed.")
_JSON = flags.DEFINE_string("json", None, "Also write the results as JSON here.")


@dataclasses.dataclass(frozen=True)
class ToySettings:
  """Everything that defines one toy run (defaults: docs/results.md's toy table)."""
  data_dim: int = 8
  width: int = 128
  depth: int = 3
  pretrain_steps: int = 4000
  train_steps: int = 3000
  batch: int = 256
  learning_rate: float = 1e-3
  mcm_learning_rate: float = 3e-4
  warmup: int = 200
  ema_decay: float = 0.999
  # The paper anneals 64 -> 1280 teacher steps over half of training (§3.2); the toy
  # keeps the shape of that schedule on a shorter run.
  teacher_steps_start: int = 64
  teacher_steps_end: int = 1280
  eta: float = 0.75
  huber_epsilon: float = 1e-4
  weighting: str = "snr_plus_one"
  boundaries: str = "uniform"
  direct_solver: str = "ddim"  # the Direct-CM paper's solver (§10.2)
  teacher_solver: str = "addim"  # CD's teacher step: the paper's aDDIM (§5.5) or DDIM (Table 4)
  num_eval: int = 10_000
  pd_start: int = 64  # PD: the first halving's teacher steps (student: pd_start / 2)
  equal_compute: bool = False  # other modes at S: PD's steps to S (halvings x train_steps)
  seed: int = 0
  chunk: int = 250  # train steps per compiled call (lax.scan): no per-step host syncs


def toy_config(settings: ToySettings, mode: str, student_steps: int = 1):
  """The mixture config of one toy model (config_base.mixture_config plus the settings)."""
  c = config_base.mixture_config(mode, student_steps, data_dim=settings.data_dim)
  c.seed = settings.seed
  c.model.width, c.model.depth = settings.width, settings.depth
  c.batch_size = settings.batch
  c.num_train_steps = settings.pretrain_steps if mode == "diffusion" else settings.train_steps
  c.optimizer.learning_rate = (settings.learning_rate if mode == "diffusion"
                               else settings.mcm_learning_rate)
  c.optimizer.warmup_steps = settings.warmup
  c.ema_decays = (settings.ema_decay,)
  c.loss.teacher_steps_start = settings.teacher_steps_start
  c.loss.teacher_steps_end = settings.teacher_steps_end
  c.loss.anneal_steps = c.num_train_steps // 2
  c.loss.eta = settings.eta
  c.loss.huber_epsilon = settings.huber_epsilon
  c.loss.weighting = settings.weighting
  c.loss.boundaries = settings.boundaries
  if mode == "direct":
    c.loss.teacher_solver = settings.direct_solver
  elif mode == "cd":
    c.loss.teacher_solver = settings.teacher_solver
  if mode == "pd":  # one halving, trained as the official outer loop trains it
    c.loss.teacher_solver = settings.teacher_solver
    config_base.pd_outer_loop(c, settings.train_steps)
  elif mode != "diffusion" and settings.equal_compute:
    c.num_train_steps = config_base.pd_halvings(settings.pd_start,
                                                student_steps) * settings.train_steps
    c.loss.anneal_steps = c.num_train_steps // 2
  return c


def _train(config, model, schedule, params, mix, key, teacher_fn_factory=None, chunk=250,
           teacher_params=None):
  """Trains with the trainer's own loss and step; returns the EMA parameters and losses.

  The teacher is `teacher_fn_factory` (the exact denoiser), else `model` with
  `teacher_params` (a PD halving after the first)."""
  tx, lr_schedule = optim.make_optimizer(config.optimizer, config.num_train_steps)
  loss_fn = train_step.make_loss_fn(plan_lib.RunPlan.from_config(config), model, schedule,
                                    teacher_model=model, teacher_fn_factory=teacher_fn_factory)
  step_fn = train_step.make_train_step(config, loss_fn, tx, lr_schedule)
  k_state, k_data = jax.random.split(key)
  state = train_step.create_state(params, tx, k_state, len(config.ema_decays))
  batch_size = config.batch_size

  def one_step(state, _):
    x = mix.sample(jax.random.fold_in(k_data, state.step), batch_size)[0]
    state, metrics = step_fn(state, {"x": x, "label": jnp.zeros((batch_size,), jnp.int32)},
                             teacher_params)
    return state, metrics["loss"]

  run_chunk = jax.jit(lambda s: jax.lax.scan(one_step, s, None, length=chunk))
  trace = []
  for _ in range(max(1, config.num_train_steps // chunk)):
    state, chunk_losses = run_chunk(state)
    trace.append(float(jnp.mean(chunk_losses)))
  if not np.all(np.isfinite(trace)):
    raise FloatingPointError(f"non-finite training loss: {trace}")
  return state.ema["ema0"], trace


def _fresh_params(model, key):
  return partitioning.unbox(train_step.init_params(model, key))


def _rms(a, b):
  return float(jnp.sqrt(jnp.mean(jnp.square(jnp.asarray(a) - jnp.asarray(b)))))


def run(settings: ToySettings, student_steps: Sequence[int], modes: Sequence[str], log=print,
        anystep: str = "", separate: bool = True, anystep_probs: Sequence[float] = ()):
  """Runs the whole experiment and returns the result rows (dicts)."""
  if anystep_probs:  # refused before any training, by the trainer's own check
    config_checks.check_anystep_probs(config_base.set_anystep(
        toy_config(settings, "cd"), student_steps, anystep, anystep_probs).loss)
  start_time = time.time()
  key = jax.random.PRNGKey(settings.seed)
  k_init, k_pre, k_train, k_noise, k_ref, k_null = jax.random.split(key, 6)
  mix = mixture_lib.default_mixture(dim=settings.data_dim, seed=settings.seed)
  base = toy_config(settings, "diffusion")
  model, schedule = config_build.get_model(base), config_build.get_schedule(base)
  exact = lambda z, t: mix.denoise(z, t, schedule)
  exact_factory = lambda teacher_params, labels: exact

  params = _fresh_params(model, k_init)
  pretrained, trace = _train(base, model, schedule, params, mix, k_pre, chunk=settings.chunk)
  log(f"[{time.time() - start_time:6.1f}s] diffusion pretraining: loss {trace[0]:.4f} -> "
      f"{trace[-1]:.4f}")

  # Evaluation: shared noise for every sampler, a true reference sample, the noise floor.
  z1 = jax.random.normal(k_noise, (settings.num_eval, settings.data_dim))
  truth = mix.sample(k_ref, settings.num_eval)[0]
  # The teacher's rows are Algorithm 3 as written: aDDIM on every step, the last one too
  # (`sample_on_grid`; `sampling.sample` ends aDDIM with a DDIM step by default). On this
  # toy aDDIM's own last step is the better one (docs/results.md, the sampler comparison).
  sample_teacher = jax.jit(
      lambda z, k, smp: sampling.sample_on_grid(exact, z, schedule, sampling.uniform_grid(k), smp),
      static_argnums=(1, 2))
  teacher_addim = sample_teacher(z1, 512, "addim")
  ode_solution = sample_teacher(z1, 512, "ddim")

  def row(name, steps, x, **extra):
    return {"model": name, "steps": steps, "ed_truth": energy.energy_distance(x, truth),
            "ed_teacher": energy.energy_distance(x, teacher_addim),
            "ode_error": _rms(x, ode_solution), **extra}

  # The noise floor: energy distances of independent true samples to the reference.
  null = [energy.energy_distance(mix.sample(k, settings.num_eval)[0], truth)
          for k in jax.random.split(k_null, 5)]
  rows = [{"model": "truth, 5 independent samples (mean / max)", "steps": "-",
           "ed_truth": float(np.mean(null)), "ed_truth_max": float(np.max(null))}]
  for smp in ("ddim", "addim"):
    for k in (8, 16, 512):
      rows.append(row(f"teacher {smp}", k, sample_teacher(z1, k, smp)))
  pretrained_sampler = jax.jit(lambda p, z: sampling.sample_on_grid(
      denoiser.make_denoise_fn(model, p, schedule), z, schedule, sampling.uniform_grid(64),
      "addim"))
  rows.append(row("pretrained MLP (diffusion, aDDIM)", 64, pretrained_sampler(pretrained, z1)))
  log(f"[{time.time() - start_time:6.1f}s] teacher and reference rows done")

  def student_rows(config, label, counts, params):
    model = config_build.get_model(config)
    out = []
    for s in counts:
      spec = plan_lib.RunPlan.from_config(config).sampler(s)
      x = jax.jit(generation.make_sample_fn(model, schedule, spec))(params, z1, None)
      r = row(label, s, x)
      out.append(r)
      log(f"[{time.time() - start_time:6.1f}s] {label} S={s}: ED truth {r['ed_truth']:.4f}, "
          f"ED teacher {r['ed_teacher']:.4f}, ODE error {r['ode_error']:.4f}")
    return out

  for mode in modes:
    objective = plan_lib.Objective(mode)
    factory = exact_factory if objective.needs_teacher else None
    if objective is plan_lib.Objective.PD:
      rows += _progressive_distillation(settings, student_steps, pretrained, mix, schedule,
                                        exact_factory, jax.random.fold_in(k_train, 5),
                                        student_rows)
      continue
    if separate:
      for s in student_steps:
        config = toy_config(settings, mode, s)
        params, _ = _train(config, config_build.get_model(config), schedule, pretrained, mix,
                           jax.random.fold_in(k_train, s * 10 + len(mode)), factory,
                           settings.chunk)
        rows += student_rows(config, f"MCM-{mode.upper()}", [s], params)
    if anystep:
      # One model for every S, trained as long as the separate models together.
      config = config_base.set_anystep(toy_config(settings, mode), student_steps, anystep,
                                       anystep_probs)
      config.num_train_steps = settings.train_steps * len(student_steps)
      config.loss.anneal_steps = config.num_train_steps // 2
      model = config_build.get_model(config)
      # The pretrained weights, plus the zero-initialised segment conditioning.
      start = train_step.merge_params(_fresh_params(model, k_init), pretrained)
      params, _ = _train(config, model, schedule, start, mix,
                         jax.random.fold_in(k_train, 7 + len(mode)), factory, settings.chunk)
      label = f"MCM-{mode.upper()} any-step ({anystep}" + (
          f", shares {'/'.join(f'{p:g}' for p in config.loss.anystep_probs)})"
          if anystep_probs else ")")
      new_rows = student_rows(config, label, sorted(student_steps), params)
      diag = anystep_diagnostics(config, model, schedule, params, mix, factory,
                                 jax.random.fold_in(k_train, 11), settings.num_eval)
      for r, loss, norm, cos in zip(new_rows, diag["loss"], diag["grad_norm"], diag["grad_cos"]):
        r.update(final_loss=loss, grad_norm=norm, grad_cos=cos)
      log(f"[{time.time() - start_time:6.1f}s] {label}: loss per S {_fmt(diag['loss'])}, "
          f"gradient norm per S {_fmt(diag['grad_norm'])}, gradient cosines "
          f"{[_fmt(c) for c in diag['grad_cos']]}")
      rows += new_rows
  return rows


def _fmt(values):
  return "/".join(f"{v:.3g}" for v in values)


def anystep_diagnostics(config, model, schedule, params, mix, teacher_fn_factory, key,
                        batch: int):
  """Where an any-step model's step counts pull: on one large batch at the end
  of training (the final teacher grid), each S's mean loss, the norm of the gradient of
  that mean, and the cosines between the S's gradients (negative: they conflict)."""
  loss_fn = train_step.make_loss_fn(plan_lib.RunPlan.from_config(config), model, schedule,
                                    teacher_model=model, teacher_fn_factory=teacher_fn_factory)
  k_data, k_loss = jax.random.split(key)
  data = {"x": mix.sample(k_data, batch)[0], "label": jnp.zeros((batch,), jnp.int32)}
  per_count = lambda p: loss_fn(p, None, data, config.num_train_steps, k_loss)[1][
      "loss_per_step_count"]
  losses_, jac = jax.jit(lambda p: (per_count(p), jax.jacrev(per_count)(p)))(params)
  g = jnp.concatenate([j.reshape(j.shape[0], -1) for j in jax.tree.leaves(jac)], axis=1)
  norms = jnp.linalg.norm(g, axis=1)
  cos = (g @ g.T) / jnp.maximum(norms[:, None] * norms[None, :], 1e-30)
  return {"loss": [float(v) for v in losses_], "grad_norm": [float(v) for v in norms],
          "grad_cos": [[float(v) for v in row] for row in cos]}


def _progressive_distillation(settings, student_steps, pretrained, mix, schedule, exact_factory,
                              key, student_rows):
  """The PD chain N = pd_start/2, ..., min(S): the first halving distils the exact denoiser,
  each later one the student before it; rows at every N in `student_steps`."""
  rows, params, teacher_params = [], pretrained, None
  n = settings.pd_start // 2
  while n >= min(student_steps):
    config = toy_config(settings, "pd", n)
    model = config_build.get_model(config)
    params, _ = _train(config, model, schedule, params, mix, jax.random.fold_in(key, n),
                       exact_factory if teacher_params is None else None, settings.chunk,
                       teacher_params)
    if n in student_steps:
      rows += student_rows(config, f"PD ({config.loss.teacher_solver} teacher)", [n], params)
    teacher_params, n = params, n // 2
  return rows


def format_table(rows) -> str:
  lines = ["| model | steps | ED to truth | ED to teacher (512 aDDIM) | ODE error (RMS) |",
           "|---|---|---|---|---|"]
  fmt = lambda r, k: f"{r[k]:.4f}" if k in r else "-"
  for r in rows:
    ed = fmt(r, "ed_truth") + (f" / {r['ed_truth_max']:.4f}" if "ed_truth_max" in r else "")
    lines.append(f"| {r['model']} | {r['steps']} | {ed} | "
                 f"{fmt(r, 'ed_teacher')} | {fmt(r, 'ode_error')} |")
  return "\n".join(lines)


def check_inputs() -> tuple[ToySettings, list[int], list[float]]:
  """The settings, step counts and any-step shares of the flags; raises inputs.InputError
  (one line naming the flag) for any that cannot be run, before anything is trained."""
  for flag in ("pretrain_steps", "train_steps", "batch", "num_eval", "pd_start"):
    inputs.positive(flag, flags.FLAGS[flag].value)
  student_steps = inputs.numbers("student_steps", _STUDENT_STEPS.value, int, minimum=1)
  unknown = [m for m in _MODES.value if m not in losses.MODES]
  if unknown or not _MODES.value:
    raise inputs.InputError(f"--modes={','.join(_MODES.value)}: each must be one of "
                            f"{list(losses.MODES)}, got {unknown or 'nothing'}")
  if "pd" in _MODES.value or _EQUAL_COMPUTE.value:
    p = _PD_START.value
    for s in student_steps:
      if p % s or (p // s) & (p // s - 1) or p == s:
        raise inputs.InputError(f"--student_steps: {s} is not --pd_start={p} halved one or "
                                f"more times")
  probs = (inputs.numbers("anystep_probs", _ANYSTEP_PROBS.value, float, minimum=0)
           if _ANYSTEP_PROBS.value else [])
  if probs and (not _ANYSTEP.value or len(probs) != len(student_steps)):
    raise inputs.InputError(f"--anystep_probs: one share per --student_steps value, with "
                            f"--anystep; got {_ANYSTEP_PROBS.value}")
  settings = ToySettings(pretrain_steps=_PRETRAIN_STEPS.value, train_steps=_TRAIN_STEPS.value,
                         batch=_BATCH.value, num_eval=_NUM_EVAL.value,
                         weighting=_WEIGHTING.value, huber_epsilon=_HUBER.value,
                         boundaries=_BOUNDARIES.value, teacher_solver=_TEACHER_SOLVER.value,
                         pd_start=_PD_START.value, equal_compute=_EQUAL_COMPUTE.value,
                         seed=_SEED.value)
  try:  # each model's config, key by key, as the trainer checks its own
    for mode in ["diffusion", *_MODES.value]:
      for s in student_steps:
        config_checks.check_keys(toy_config(settings, mode, s))
    if probs:
      config_checks.check_anystep_probs(config_base.set_anystep(
          toy_config(settings, "cd"), student_steps, _ANYSTEP.value, probs).loss)
  except config_checks.ConfigError as e:
    raise inputs.InputError(f"a toy model's {e}") from None
  inputs.check_output_file(_JSON.value, "--json")
  return settings, student_steps, probs


def main(argv):
  del argv  # flags only (inputs.flags_parser)
  with inputs.refusals("toy"):
    settings, student_steps, probs = check_inputs()
  try:
    rows = run(settings, student_steps, _MODES.value, anystep=_ANYSTEP.value,
               separate=not _SKIP_SEPARATE.value, anystep_probs=probs)
  except FloatingPointError as e:  # as the trainer's exit 5 (docs/operations.md)
    inputs.fail("toy", 5, f"{e}: lower the learning rate or change the flags")
  print(format_table(rows))
  if _JSON.value:
    with open(_JSON.value, "w") as fh:
      json.dump({"settings": dataclasses.asdict(settings), "anystep": _ANYSTEP.value,
                 "anystep_probs": probs,
                 "rows": rows}, fh, indent=2)


if __name__ == "__main__":
  app.run(main, flags_parser=inputs.flags_parser("toy"))
