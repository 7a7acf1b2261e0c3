"""The toy experiment: Multistep CMs on a Gaussian mixture whose exact denoiser is the teacher.

    python -m multistep_cm.toy [--student_steps=1,2,4,8] [--modes=cd,ct,direct] [--json=FILE]

1. Pretrain a small MLP as a diffusion model on mixture samples (the v-loss), as
   the paper initialises every student from the diffusion model (§7.1).
2. From that initialisation, for each mode and student step count S:
   * `cd`: distil the exact denoiser E[x | z_t] with the aDDIM teacher step (§3, §5.5);
   * `ct`: consistency training from samples (x_teacher = x);
   * `direct`: Direct CM (§10): regress onto the teacher's full DDIM solve from t
     to the segment start.
3. Report, per mode and S, the energy distance of S-step samples to the true
   mixture and to the teacher's 512-step aDDIM sampler, and the ODE error: the RMS
   distance to the teacher's 512-step DDIM solve (the probability-flow ODE) from the
   same noise. Reference rows give the teacher's own samplers and the noise floor
   (two independent true samples).

Everything runs on the CPU in a few minutes; the README table comes from the default command.
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
import optax

from multistep_cm import models
from multistep_cm.data import mixture as mixture_lib
from multistep_cm.diffusion import losses
from multistep_cm.diffusion import process
from multistep_cm.diffusion import sampling
from multistep_cm.diffusion import schedules
from multistep_cm.evaluation import energy

_STUDENT_STEPS = flags.DEFINE_list("student_steps", ["1", "2", "4", "8"], "Student step counts S.")
_MODES = flags.DEFINE_list("modes", ["cd", "ct", "direct"], "Training modes.")
_PRETRAIN_STEPS = flags.DEFINE_integer("pretrain_steps", 4000, "Diffusion pretraining steps.")
_TRAIN_STEPS = flags.DEFINE_integer("train_steps", 3000, "Steps per student.")
_BATCH = flags.DEFINE_integer("batch", 256, "Batch size.")
_NUM_EVAL = flags.DEFINE_integer("num_eval", 10_000, "Samples per evaluation.")
_HUBER = flags.DEFINE_float("huber_epsilon", 1e-4, "Pseudo-Huber epsilon (§3.6).")
_WEIGHTING = flags.DEFINE_enum("weighting", "snr_plus_one", list(losses.WEIGHTINGS),
                               "Loss weighting (see diffusion/losses.py).")
_SEED = flags.DEFINE_integer("seed", 0, "Random seed.")
_JSON = flags.DEFINE_string("json", None, "Also write the results as JSON here.")


@dataclasses.dataclass(frozen=True)
class ToySettings:
  """Everything that defines one toy run (defaults: the README table)."""
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
  direct_solver: str = "ddim"  # the Direct-CM paper's solver (§10.2)
  num_eval: int = 10_000
  seed: int = 0
  chunk: int = 250  # train steps per compiled call (lax.scan): no per-step host syncs


def _denoiser(model, schedule):
  """`f(params, z, t, rng) -> x̂` from the v-predicting network."""
  def f(params, z, t, rng=None):
    rngs = None if rng is None else {"dropout": rng}
    v = model.apply({"params": params}, z, schedule.logsnr(t), None, train=rng is not None,
                    rngs=rngs)
    return process.x_from_v(v, z, t, schedule)
  return f


def _optimizer(lr: float, steps: int, warmup: int):
  schedule = optax.warmup_cosine_decay_schedule(0.0, lr, warmup, max(steps, warmup + 1),
                                                end_value=lr * 0.05)
  return optax.chain(optax.clip_by_global_norm(1.0), optax.adam(schedule))


def _train(loss_fn, params, steps: int, lr: float, settings: ToySettings, key):
  """Adam with EMA; `loss_fn(params, step, key) -> scalar`. Returns the EMA params."""
  opt = _optimizer(lr, steps, settings.warmup)
  state = (jnp.int32(0), params, opt.init(params), params)

  def one_step(state, _):
    step, params, opt_state, ema = state
    loss, grads = jax.value_and_grad(loss_fn)(params, step, jax.random.fold_in(key, step))
    updates, opt_state = opt.update(grads, opt_state, params)
    params = optax.apply_updates(params, updates)
    ema = optax.incremental_update(params, ema, 1.0 - settings.ema_decay)
    return (step + 1, params, opt_state, ema), loss

  run_chunk = jax.jit(lambda s: jax.lax.scan(one_step, s, None, length=settings.chunk))
  loss_trace = []
  for _ in range(max(1, steps // settings.chunk)):
    state, chunk_losses = run_chunk(state)
    loss_trace.append(float(jnp.mean(chunk_losses)))
  if not np.all(np.isfinite(loss_trace)):
    raise FloatingPointError(f"non-finite training loss: {loss_trace}")
  return state[3], loss_trace


def _rms(a, b):
  return float(jnp.sqrt(jnp.mean(jnp.square(jnp.asarray(a) - jnp.asarray(b)))))


def run(settings: ToySettings, student_steps: Sequence[int], modes: Sequence[str], log=print):
  """Runs the whole experiment and returns the result rows (dicts)."""
  start_time = time.time()
  key = jax.random.PRNGKey(settings.seed)
  k_init, k_pre, k_train, k_noise, k_ref, k_null = jax.random.split(key, 6)
  mix = mixture_lib.default_mixture(dim=settings.data_dim, seed=settings.seed)
  schedule = schedules.cosine()
  model = models.get_model("mlp_toy", data_dim=settings.data_dim, width=settings.width,
                           depth=settings.depth)
  f = _denoiser(model, schedule)
  teacher = lambda z, t: mix.denoise(z, t, schedule)
  dim, batch = settings.data_dim, settings.batch

  params = model.init({"params": k_init}, jnp.zeros((1, dim)), jnp.zeros((1,)), None)["params"]

  def diffusion_loss(params, step, key):
    kx, ke, kt = jax.random.split(key, 3)
    x = mix.sample(kx, batch)[0]
    t = losses.sample_diffusion_times(kt, batch)
    return jnp.mean(losses.diffusion_loss(lambda z, t: f(params, z, t), x,
                                          jax.random.normal(ke, x.shape), t, schedule))

  init_params, trace = _train(diffusion_loss, params, settings.pretrain_steps,
                              settings.learning_rate, settings, k_pre)
  log(f"[{time.time() - start_time:6.1f}s] diffusion pretraining: loss {trace[0]:.4f} -> "
      f"{trace[-1]:.4f}")

  # Evaluation: shared noise for every sampler, a true reference sample, the noise floor.
  z1 = jax.random.normal(k_noise, (settings.num_eval, dim))
  truth = mix.sample(k_ref, settings.num_eval)[0]
  sample_teacher = jax.jit(lambda z, k, smp: sampling.sample(teacher, z, schedule, k, smp),
                           static_argnums=(1, 2))
  teacher_addim = sample_teacher(z1, 512, "addim")
  ode_solution = sample_teacher(z1, 512, "ddim")
  # The noise floor: energy distances of independent true samples to the reference.
  null = [energy.energy_distance(mix.sample(k, settings.num_eval)[0], truth)
          for k in jax.random.split(k_null, 5)]
  rows = [{"model": "truth, 5 independent samples (mean / max)", "steps": "-",
           "ed_truth": float(np.mean(null)), "ed_truth_max": float(np.max(null))}]
  for smp in ("ddim", "addim"):
    for k in (8, 16, 512):
      x = sample_teacher(z1, k, smp)
      rows.append({"model": f"teacher {smp}", "steps": k,
                   "ed_truth": energy.energy_distance(x, truth),
                   "ed_teacher": energy.energy_distance(x, teacher_addim),
                   "ode_error": _rms(x, ode_solution)})
  pre = jax.jit(lambda p, z: sampling.sample(lambda z, t: f(p, z, t), z, schedule, 64, "addim"))
  x = pre(init_params, z1)
  rows.append({"model": "pretrained MLP (diffusion, aDDIM)", "steps": 64,
               "ed_truth": energy.energy_distance(x, truth),
               "ed_teacher": energy.energy_distance(x, teacher_addim),
               "ode_error": _rms(x, ode_solution)})
  log(f"[{time.time() - start_time:6.1f}s] teacher and reference rows done")

  for mode in modes:
    for S in student_steps:
      def mcm_loss(params, step, key, S=S, mode=mode):
        kx, ke, kseg, kd = jax.random.split(key, 4)
        x = mix.sample(kx, batch)[0]
        n_teacher = losses.teacher_steps(step, settings.teacher_steps_start,
                                         settings.teacher_steps_end, settings.train_steps // 2)
        grid = losses.make_grid(n_teacher, S)
        segment, n_rel = losses.sample_segments(kseg, batch, grid)
        loss, _ = losses.mcm_loss(
            lambda z, t, rng: f(params, z, t, rng), x, jax.random.normal(ke, x.shape), segment,
            n_rel, kd, schedule=schedule, mode=mode, grid=grid,
            teacher_fn=teacher, eta=settings.eta, huber_epsilon=settings.huber_epsilon,
            weighting=settings.weighting,
            teacher_solver=settings.direct_solver if mode == "direct" else "addim",
            direct_x_var="analytic")
        return jnp.mean(loss)

      params, trace = _train(mcm_loss, init_params, settings.train_steps,
                             settings.mcm_learning_rate, settings,
                             jax.random.fold_in(k_train, S * 10 + len(mode)))
      x = jax.jit(lambda p, z, S=S: sampling.sample_mcm(lambda z, t: f(p, z, t), z, schedule,
                                                         S))(params, z1)
      row = {"model": f"MCM-{mode.upper()}", "steps": S,
             "ed_truth": energy.energy_distance(x, truth),
             "ed_teacher": energy.energy_distance(x, teacher_addim),
             "ode_error": _rms(x, ode_solution), "final_loss": trace[-1]}
      rows.append(row)
      log(f"[{time.time() - start_time:6.1f}s] {row['model']} S={S}: ED truth "
          f"{row['ed_truth']:.4f}, ED teacher {row['ed_teacher']:.4f}, "
          f"ODE error {row['ode_error']:.4f}")
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


def main(argv):
  del argv
  settings = ToySettings(pretrain_steps=_PRETRAIN_STEPS.value, train_steps=_TRAIN_STEPS.value,
                         batch=_BATCH.value, num_eval=_NUM_EVAL.value,
                         weighting=_WEIGHTING.value, huber_epsilon=_HUBER.value,
                         seed=_SEED.value)
  for mode in _MODES.value:
    if mode not in losses.MODES:
      raise app.UsageError(f"--modes: {mode!r} is not one of {losses.MODES}")
  rows = run(settings, [int(s) for s in _STUDENT_STEPS.value], _MODES.value)
  print(format_table(rows))
  if _JSON.value:
    with open(_JSON.value, "w") as fh:
      json.dump({"settings": dataclasses.asdict(settings), "rows": rows}, fh, indent=2)


if __name__ == "__main__":
  app.run(main)
