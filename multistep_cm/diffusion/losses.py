"""Training objectives: the diffusion v-loss, the Multistep CM loss in modes ct, cd and
direct (docs/maths.md §3, §10) and Progressive Distillation, mode pd (§14).

Functions here are pure: they take the networks as functions (`student_fn(z, t, rng) -> x̂`,
`rng` its dropout key, the same for both student calls; `teacher_fn(z, t) -> x̂`, or
`(x̂_guided, x̂_conditional)` for a guided teacher) and the random draws (noise, times) as
arrays, so tests can set every draw, and return per-example losses `[B]`; the trainer
takes the batch mean.

The maths: docs/maths.md §3, §10 and §14; the design and the choices where the paper is
ambiguous: docs/design.md#losses.
"""
import math
from typing import Callable, NamedTuple

import jax
import jax.numpy as jnp

from multistep_cm.diffusion import process
from multistep_cm.diffusion import schedules as schedules_lib
from multistep_cm.diffusion import segments
from multistep_cm.diffusion import solvers

Schedule = schedules_lib.Schedule
# The Multistep CM objectives (mcm_loss) and Progressive Distillation (pd_loss).
MCM_MODES = ("ct", "cd", "direct")
MODES = MCM_MODES + ("pd",)
# The modes whose target calls a teacher network; CT's teacher step uses the data (§3).
TEACHER_MODES = ("cd", "direct", "pd")
WEIGHTINGS = ("snr_plus_one", "v_space")
HUBER_REDUCTIONS = ("mean", "sum", "elementwise")
TEACHER_SOLVERS = ("addim", "ddim")
DIRECT_X_VAR_RULES = ("data", "analytic")
PD_WEIGHTINGS = ("snr_trunc", "snr_plus_one")
PD_MIDPOINT_X_VAR = ("data", "first_step", "analytic")


# --- distances and weights --------------------------------------------------------------------


def pseudo_huber(a, epsilon: float = 1e-4, reduction: str = "mean"):
  """Per-example pseudo-Huber distance of `a` (`[B, ...]`) to zero, `[B]` (§3.6)."""
  axes = solvers.data_axes(a)
  c = jnp.float32(epsilon)
  if reduction == "mean":
    return jnp.sqrt(jnp.mean(jnp.square(a), axis=axes) + c * c) - c
  if reduction == "sum":
    return jnp.sqrt(jnp.sum(jnp.square(a), axis=axes) + c * c) - c
  if reduction == "elementwise":
    return jnp.mean(jnp.sqrt(jnp.square(a) + c * c) - c, axis=axes)
  raise ValueError(f"huber_reduction must be one of {HUBER_REDUCTIONS}, got {reduction!r}")


def weighted_distance(x_diff, t, schedule: Schedule, weighting: str, epsilon: float,
                      reduction: str):
  """`w(t) d(x_diff)` for the two readings of the paper's SNR + 1 weighting (§3.6)."""
  _, sigma = solvers.alpha_sigma(schedule, t)
  if weighting == "v_space":
    return pseudo_huber(x_diff / solvers.bcast(sigma, x_diff), epsilon, reduction)
  if weighting == "snr_plus_one":
    return pseudo_huber(x_diff, epsilon, reduction) / jnp.square(sigma)
  raise ValueError(f"weighting must be one of {WEIGHTINGS}, got {weighting!r}")


# --- diffusion pretraining --------------------------------------------------------------------


DIFFUSION_PREDICTIONS = ("v", "velocity")
# The diffusion loss's weighting of the squared x-error: SNR + 1 (the v-loss, ours) or SNR
# (the eps-loss, DDPM's and DiT's L_simple, the one an eps-predicting module is made for).
DIFFUSION_WEIGHTINGS = ("snr_plus_one", "snr")


def diffusion_loss(denoise_fn: Callable, x, eps, t, schedule: Schedule, prediction: str = "v",
                   weighting: str = "snr_plus_one"):
  """The v-loss `(SNR(t) + 1) ||x - x̂||^2 / d = ||v - v̂||^2 / d` per example (§1.3), or for
  a flow-matching teacher (`prediction="velocity"`) the velocity loss `||u - û||^2 / d`, u =
  eps - x, which is `(alpha + sigma)^2` times the v-loss (§17.5). With `weighting="snr"`,
  the eps-loss `SNR(t) ||x - x̂||^2 / d = ||eps - epŝ||^2 / d` (§1.3), `alpha^2` times the
  v-loss: the v-loss weighs an eps-predictor's errors by `1 / alpha^2`, which on DDPM's
  linear schedule is ~24,000 at its last time.

  Args:
    denoise_fn: `denoise_fn(z, t) -> x̂`.
    x: data `[B, ...]`; eps: noise of the same shape; t: `[B]` times in (0, 1].
    prediction: "v" or "velocity": what the network predicts, and so what its loss is on.
    weighting: "snr_plus_one" or "snr" (not with "velocity", which is its own loss).
  """
  if prediction not in DIFFUSION_PREDICTIONS:
    raise ValueError(f"prediction must be one of {DIFFUSION_PREDICTIONS}, got {prediction!r}")
  if weighting not in DIFFUSION_WEIGHTINGS or (prediction == "velocity"
                                               and weighting != "snr_plus_one"):
    raise ValueError(f"weighting must be one of {DIFFUSION_WEIGHTINGS} ('snr_plus_one' with "
                     f"prediction 'velocity'), got {weighting!r}")
  x_hat = denoise_fn(process.diffuse(x, eps, t, schedule), t)
  alpha, sigma = solvers.alpha_sigma(schedule, t)
  v_loss = solvers.batch_mean(jnp.square(x - x_hat), x) / jnp.square(sigma)
  if prediction == "velocity":
    return jnp.square(alpha + sigma) * v_loss
  return v_loss if weighting == "snr_plus_one" else jnp.square(alpha) * v_loss


def sample_diffusion_times(key, batch: int):
  """t ~ U(0, 1], continuous, one per example."""
  return 1.0 - jax.random.uniform(key, (batch,), jnp.float32)


# --- the teacher-step schedule and segment times (§3.1, §3.2) ---------------------------------


def teacher_steps(step, start: int = 64, end: int = 1280, anneal_steps: int = 100_000):
  """N_teacher(i): log-linear from `start` to `end` over `anneal_steps`, then held (§3.2).

  `anneal_steps = 0` (or start == end) gives a fixed N = `end`.
  """
  if anneal_steps <= 0 or start == end:
    return jnp.float32(end)
  frac = jnp.clip(jnp.asarray(step, jnp.float32) / anneal_steps, 0.0, 1.0)
  return jnp.exp(math.log(start) + frac * (math.log(end) - math.log(start)))


def steps_per_segment(n_teacher, student_steps: int):
  """N_per_segment = max(round(N_teacher / student_steps), 1), int32 (Algorithm 1, line 2)."""
  return jnp.maximum(jnp.round(jnp.asarray(n_teacher, jnp.float32) / student_steps),
                     1).astype(jnp.int32)


class SegmentGrid(NamedTuple):
  """Where the student's segments lie on the teacher's grid of T steps of 1/T (§3.1).

  Segment k of an example holds the grid points `bounds[k] < t T <= bounds[k + 1]`.
  `bounds` is int32 `[S + 1]` shared by the batch, or `[B, S_max + 1]` per example
  (any-step training; a row with S < S_max repeats T after its last boundary), and
  `student_steps` is S: a scalar, or `[B]`.
  """
  bounds: jax.Array
  num_steps: jax.Array  # T
  student_steps: jax.Array


def make_grid(n_teacher, student_steps: int, boundaries=None) -> SegmentGrid:
  """The grid of one step count: T = N_per_segment * S (Algorithm 1, line 2).

  `boundaries` are S + 1 times from 0 to 1 (segments.boundaries; default uniform, the
  paper's equal segments), snapped to the 1/T grid.
  """
  nps = steps_per_segment(n_teacher, student_steps)
  num_steps = nps * student_steps
  if boundaries is None:
    bounds = jnp.arange(student_steps + 1, dtype=jnp.int32) * nps
  else:
    bounds = segments.grid_bounds(boundaries, num_steps)
  return SegmentGrid(bounds, num_steps, jnp.int32(student_steps))


def make_anystep_grid(n_teacher, step_counts, boundaries, choice) -> SegmentGrid:
  """Per-example grids for any-step training: example b uses `step_counts[choice[b]]`.

  One T serves every step count: T = N_per_segment(S_max) * S_max, so with the
  nested boundaries of `segments.boundaries` every S in {1, 2, 4, ...} up to S_max
  puts its boundaries on the same teacher grid.

  Args:
    n_teacher: N_teacher(i).
    step_counts: the static tuple of step counts.
    boundaries: one array of S + 1 times per step count (None: uniform).
    choice: int `[B]` index into `step_counts`.
  """
  s_max = max(step_counts)
  num_steps = steps_per_segment(n_teacher, s_max) * s_max
  rows = []
  for s, b in zip(step_counts, boundaries):
    b = jnp.arange(s + 1, dtype=jnp.float32) / s if b is None else b
    row = segments.grid_bounds(b, num_steps)
    rows.append(jnp.concatenate([row, jnp.full((s_max - s,), num_steps, jnp.int32)]))
  table = jnp.stack(rows)
  counts = jnp.asarray(step_counts, jnp.int32)
  return SegmentGrid(table[choice], num_steps, counts[choice])


def _example_bounds(grid: SegmentGrid, batch: int):
  bounds = jnp.asarray(grid.bounds, jnp.int32)
  return jnp.broadcast_to(bounds, (batch,) + bounds.shape[-1:])


def sample_segments(key, batch: int, grid: SegmentGrid):
  """Draws `step ~ U{0..S-1}` and `n_rel ~ U{1..n_k}` per example (Algorithm 1, lines 3-4).

  Every segment is equally likely, as in the paper, whatever its length; `n_k` is the
  number of grid steps in the drawn segment (N_per_segment for equal segments).
  """
  k_step, k_rel = jax.random.split(key)
  s = jnp.broadcast_to(jnp.asarray(grid.student_steps, jnp.int32), (batch,))
  segment = jax.random.randint(k_step, (batch,), 0, s, jnp.int32)
  bounds = _example_bounds(grid, batch)
  start = jnp.take_along_axis(bounds, segment[:, None], 1)[:, 0]
  end = jnp.take_along_axis(bounds, segment[:, None] + 1, 1)[:, 0]
  n_rel = jax.random.randint(k_rel, (batch,), 1, end - start + 1, jnp.int32)
  return segment, n_rel


def segment_start(segment, grid: SegmentGrid):
  """The grid index of each example's segment start, `t_step * T` (int32 `[B]`)."""
  bounds = _example_bounds(grid, segment.shape[0])
  return jnp.take_along_axis(bounds, segment.astype(jnp.int32)[:, None], 1)[:, 0]


def segment_times(segment, n_rel, grid: SegmentGrid):
  """`(t_step, t, s)`: `t = t_step + n_rel / T` and `s = t - 1 / T`.

  Computed from integers over one denominator, so s == t_step exactly when n_rel = 1.
  """
  T = jnp.asarray(grid.num_steps, jnp.float32)
  start = segment_start(segment, grid)
  t_step = start.astype(jnp.float32) / T
  t = (start + n_rel).astype(jnp.float32) / T
  s = (start + n_rel - 1).astype(jnp.float32) / T
  return t_step, t, s


# --- the Multistep CM objective (Algorithm 1, §3; Direct CM, §10) -----------------------------


def _split_teacher_output(out):
  if isinstance(out, tuple):
    x_guided, x_cond = out
    return x_guided, x_cond
  return out, out


def _teacher_solve(teacher_fn, x, z_t, segment, n_rel, grid, schedule, solver, eta,
                   x_var_rule):
  """Direct CM target: the teacher's DDIM/aDDIM solve from t down to t_step.

  Each example takes its own `n_rel` steps of size 1/T on the training grid; the
  loop runs `max(n_rel)` times and leaves finished examples untouched (§10.2).
  Grid positions are integers, so every step lands exactly on `segment_times`'s grid.
  """
  batch = x.shape[0]
  n_rel = n_rel.astype(jnp.int32)
  T = jnp.asarray(grid.num_steps, jnp.float32)
  start = segment_start(segment, grid)

  def body(j, z):
    # Finished examples are clamped to the segment's first step; `active` discards them.
    k = jnp.maximum(start + n_rel - j, start + 1)
    tau, tau_next = k.astype(jnp.float32) / T, (k - 1).astype(jnp.float32) / T
    x_guided, x_cond = _split_teacher_output(teacher_fn(z, tau))
    if solver == "ddim":
      z_next = solvers.ddim(x_guided, z, tau, tau_next, schedule)
    else:
      x_var = (solvers.training_x_var(x_cond, x, eta) if x_var_rule == "data"
               else solvers.analytic_x_var(tau, schedule))
      z_next = solvers.addim(x_guided, z, tau, tau_next, schedule, x_var)
    active = (j < n_rel).reshape((batch,) + (1,) * (x.ndim - 1))
    return jnp.where(active, z_next, z)

  return jax.lax.fori_loop(0, jnp.max(n_rel), body, z_t)


def mcm_loss(student_fn: Callable, x, eps, segment, n_rel, dropout_rng, *, schedule: Schedule,
             mode: str, grid: SegmentGrid, teacher_fn: Callable | None = None,
             eta: float = 0.75, teacher_solver: str = "addim", huber_epsilon: float = 1e-4,
             huber_reduction: str = "mean", weighting: str = "snr_plus_one",
             direct_x_var: str = "data"):
  """The Multistep CM loss per example (Algorithm 1), in modes "ct", "cd" and "direct".

  Args:
    student_fn: `student_fn(z, t, rng) -> x̂`, the model being trained.
    x: data `[B, ...]`. eps: the noise of z_t, same shape.
    segment: `[B]` int, the segment index `step` in {0..S-1}.
    n_rel: `[B]` int, the grid steps above the segment start, in {1..n_k}.
    dropout_rng: one key used for both student calls (synchronised dropout).
    schedule: the noise schedule.
    mode: "ct" (x_teacher = x), "cd" (one teacher step) or "direct" (the teacher's
      full solve from t to the segment start as the target, Direct CM §10).
    grid: the segments on the teacher grid (`make_grid(teacher_steps(i), S)`).
    teacher_fn: `teacher_fn(z, t) -> x̂` or `(x̂_guided, x̂_cond)`; "cd"/"direct" only.
    eta: xvar_frac for the aDDIM teacher step (0.75, §5.5).
    teacher_solver: "addim" (the paper) or "ddim".
    huber_epsilon, huber_reduction: the pseudo-Huber distance (§3.6).
    weighting: "snr_plus_one" (default) or "v_space" (§3.6; docs/design.md#losses).
    direct_x_var: x_var of the aDDIM steps of the Direct solve: "data" (eta times the
      squared error of each step's teacher prediction against the true x) or
      "analytic" (0.1 / (2 + SNR)).

  Returns:
    `(loss [B], aux)`; aux holds `t`, `t_step`, `segment` and `x_target` per example
    (unused outputs cost nothing under jit).
  """
  if mode not in MCM_MODES:
    raise ValueError(f"mode must be one of {MCM_MODES}, got {mode!r}")
  if teacher_solver not in TEACHER_SOLVERS:
    raise ValueError(f"teacher_solver must be one of {TEACHER_SOLVERS}, got {teacher_solver!r}")
  if direct_x_var not in DIRECT_X_VAR_RULES:
    raise ValueError(f"direct_x_var must be one of {DIRECT_X_VAR_RULES}, got {direct_x_var!r}")
  if mode != "ct" and teacher_fn is None:
    raise ValueError(f"mode {mode!r} needs a teacher_fn")

  t_step, t, s = segment_times(segment, n_rel, grid)
  z_t = process.diffuse(x, eps, t, schedule)  # line 9

  if mode == "direct":
    z_target = _teacher_solve(teacher_fn, x, z_t, segment, n_rel, grid, schedule,
                              teacher_solver, eta, direct_x_var)
    x_target = solvers.inverse_ddim(z_target, z_t, t, t_step, schedule)
  else:
    if mode == "ct":  # lines 6-7: x_teacher = x, x_var = 0, so aDDIM is DDIM (§3.3)
      z_s = solvers.ddim(x, z_t, t, s, schedule)
    else:
      x_guided, x_cond = _split_teacher_output(teacher_fn(z_t, t))
      if teacher_solver == "ddim":
        z_s = solvers.ddim(x_guided, z_t, t, s, schedule)
      else:  # line 10, x_var from the conditional output and the true x (§5.5)
        z_s = solvers.addim(x_guided, z_t, t, s, schedule,
                            solvers.training_x_var(x_cond, x, eta))
    z_s = jax.lax.stop_gradient(z_s)
    x_ref = jax.lax.stop_gradient(student_fn(z_s, s, dropout_rng))  # line 11
    z_ref = solvers.ddim(x_ref, z_s, s, t_step, schedule)  # line 13
    x_target = solvers.inverse_ddim(z_ref, z_t, t, t_step, schedule)  # line 14 (eq. 7)

  x_target = jax.lax.stop_gradient(x_target)
  x_hat = student_fn(z_t, t, dropout_rng)  # line 12
  loss = weighted_distance(x_target - x_hat, t, schedule, weighting, huber_epsilon,
                           huber_reduction)
  return loss, {"t": t, "t_step": t_step, "segment": segment, "x_target": x_target}


# --- Progressive Distillation (Salimans & Ho 2022; the paper's baseline, Tables 3 and 5) -------


def pd_times(i, student_steps: int):
  """`(t, t_mid, s)` of student step `i` (`[B]` int in {0..N-1}) on N uniform steps:
  `t = (i + 1) / N`, `t_mid = t - 1 / (2N)`, `s = i / N`.

  Computed from integers over the teacher's denominator 2N, so s == 0 exactly when i = 0.
  """
  two_n = jnp.float32(2 * student_steps)
  i = jnp.asarray(i, jnp.int32)
  t = (2 * i + 2).astype(jnp.float32) / two_n
  t_mid = (2 * i + 1).astype(jnp.float32) / two_n
  s = (2 * i).astype(jnp.float32) / two_n
  return t, t_mid, s


def sample_pd_steps(key, batch: int, student_steps: int):
  """`i ~ U{0..N-1}` per example: the student's step, on its own uniform grid."""
  return jax.random.randint(key, (batch,), 0, student_steps, jnp.int32)


def _teacher_step(x_guided, x_var, z, t, s, schedule, solver):
  if solver == "ddim":
    return solvers.ddim(x_guided, z, t, s, schedule)
  return solvers.addim(x_guided, z, t, s, schedule, x_var)


def pd_target(teacher_fn: Callable, x, z_t, i, *, schedule: Schedule, student_steps: int,
              teacher_solver: str = "addim", eta: float = 0.75,
              midpoint_x_var: str = "data"):
  """PD's target x̃ for the student step from t = (i+1)/N to s = i/N: `(x̃, z_teacher)`.

  The teacher takes two steps t -> t - 1/(2N) -> s; x̃ is the x for which one
  student DDIM step from z_t lands on the teacher's z_s, the inverse DDIM of eq. (5)
  (the official code's `x_target`). At the last step (s = 0) a DDIM step's x is
  unconstrained by the endpoint, so the target is the teacher's second x̂, as in the
  official code's `i == 0` case (the aDDIM endpoint would carry its added noise).
  """
  if teacher_solver not in TEACHER_SOLVERS:
    raise ValueError(f"teacher_solver must be one of {TEACHER_SOLVERS}, got {teacher_solver!r}")
  if midpoint_x_var not in PD_MIDPOINT_X_VAR:
    raise ValueError(f"midpoint_x_var must be one of {PD_MIDPOINT_X_VAR}, got "
                     f"{midpoint_x_var!r}")
  t, t_mid, s = pd_times(i, student_steps)
  x_guided, x_cond = _split_teacher_output(teacher_fn(z_t, t))
  # The first aDDIM step's x_var: Algorithm 1, line 10 (the conditional output, §5.5).
  x_var = solvers.training_x_var(x_cond, x, eta)
  z_mid = _teacher_step(x_guided, x_var, z_t, t, t_mid, schedule, teacher_solver)
  x_guided_mid, x_cond_mid = _split_teacher_output(teacher_fn(z_mid, t_mid))
  if midpoint_x_var == "data":
    x_var_mid = solvers.training_x_var(x_cond_mid, x, eta)
  elif midpoint_x_var == "analytic":
    x_var_mid = solvers.analytic_x_var(t_mid, schedule)
  else:  # "first_step"
    x_var_mid = x_var
  z_teacher = _teacher_step(x_guided_mid, x_var_mid, z_mid, t_mid, s, schedule, teacher_solver)
  last = solvers.bcast(s <= 0.0, x)
  # At s = 0, c(t, 0) = 1 and inverse DDIM is z_teacher itself: finite, then replaced.
  x_target = jnp.where(last, x_guided_mid, solvers.inverse_ddim(z_teacher, z_t, t, s, schedule))
  return x_target, z_teacher


def pd_weight(t, schedule: Schedule, weighting: str):
  """The weight of the squared x-error: `max(SNR, 1)` ("snr_trunc") or `SNR + 1` (v-loss)."""
  a, sigma = solvers.alpha_sigma(schedule, t)
  snr = jnp.square(a) / jnp.square(sigma)
  if weighting == "snr_trunc":
    return jnp.maximum(snr, 1.0)
  if weighting == "snr_plus_one":
    return snr + 1.0
  raise ValueError(f"pd weighting must be one of {PD_WEIGHTINGS}, got {weighting!r}")


def pd_loss(student_fn: Callable, x, eps, i, dropout_rng, *, schedule: Schedule,
            student_steps: int, teacher_fn: Callable, teacher_solver: str = "addim",
            eta: float = 0.75, midpoint_x_var: str = "data", weighting: str = "snr_trunc"):
  """One Progressive Distillation halving's loss per example: `(loss [B], aux)`.

  The student (N steps) learns to do in one DDIM step of 1/N what the teacher does in
  two of 1/(2N) (docs/maths.md §14.1).

  Args:
    student_fn: `student_fn(z, t, rng) -> x̂`.
    x: data `[B, ...]`; eps: the noise of z_t.
    i: `[B]` int, the student step in {0..N-1} (`sample_pd_steps`): t = (i + 1) / N.
    dropout_rng: the student's dropout key.
    schedule: the noise schedule.
    student_steps: N.
    teacher_fn: `teacher_fn(z, t) -> x̂` or `(x̂_guided, x̂_cond)`: the diffusion model
      (first halving) or the previous halving's student.
    teacher_solver: "addim" (the paper's re-implementation) or "ddim" (Salimans & Ho).
    eta: xvar_frac of the aDDIM steps.
    midpoint_x_var: x_var of the second aDDIM step: "data" (eta times its own x̂'s
      squared error against x), "first_step" (the first step's) or "analytic".
    weighting: "snr_trunc" (`max(SNR, 1)`) or "snr_plus_one" (the v-loss).

  Returns:
    aux holds `t` and `x_target` per example.
  """
  if teacher_fn is None:
    raise ValueError("mode 'pd' needs a teacher_fn")
  t = pd_times(i, student_steps)[0]
  z_t = process.diffuse(x, eps, t, schedule)
  x_target, _ = pd_target(teacher_fn, x, z_t, i, schedule=schedule,
                          student_steps=student_steps, teacher_solver=teacher_solver, eta=eta,
                          midpoint_x_var=midpoint_x_var)
  x_target = jax.lax.stop_gradient(x_target)
  x_hat = student_fn(z_t, t, dropout_rng)
  loss = pd_weight(t, schedule, weighting) * solvers.batch_mean(jnp.square(x_target - x_hat), x)
  return loss, {"t": t, "x_target": x_target}
