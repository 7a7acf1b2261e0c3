"""Progressive Distillation (mode 'pd') against closed-form truth and its staged configs.

The teacher is the exact denoiser E[x | z_t] of the toy mixture. The teacher's two steps
and the student's inverse DDIM are written here from the formulas (docs/maths.md §2 and
§5.2, the paper's eq. 4, 5 and 14, with alpha and sigma from the schedule's logSNR),
independently of solvers.py.
"""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from multistep_cm.config import base as config_base
from multistep_cm.config import checks as config_checks
from multistep_cm.data import mixture as mixture_lib
from multistep_cm.diffusion import losses
from multistep_cm.diffusion import sampling
from multistep_cm.diffusion import schedules
from multistep_cm.evaluation import energy
from multistep_cm.sampling import runs
from multistep_cm.training import loop as train

from helpers import file_config
from helpers import TINY_MIXTURE

SCHEDULE = schedules.cosine()
MIX = mixture_lib.default_mixture(dim=8, seed=0)
EXACT = lambda z, t: MIX.denoise(z, t, SCHEDULE)


def _alpha_sigma(t):
  """alpha^2 = sigmoid(logSNR), sigma^2 = sigmoid(-logSNR), `[B, 1]` (t > 0)."""
  lam = SCHEDULE.logsnr(jnp.asarray(t, jnp.float32))[:, None]
  return jnp.sqrt(jax.nn.sigmoid(lam)), jnp.sqrt(jax.nn.sigmoid(-lam))


def _teacher_two_steps(z_t, x, i, n, solver, eta=0.75):
  """`(z_s, x̂_mid, z_mid)`: the teacher's steps t -> t - 1/(2N) -> s = t - 1/N, by hand.

  At s = 0 alpha_s = 1 and sigma_s = 0 (the data end). aDDIM: z_s = alpha_s x̂ +
  sqrt(sigma_s^2 + c^2 x_var / mean(eps^2)) eps with c = alpha_s - alpha_t sigma_s / sigma_t
  and x_var = eta mean((x̂ - x)^2) of each step's own x̂ (the 'data' rule at the midpoint)."""
  t, t_mid, s = (i + 1) / n, (i + 0.5) / n, i / n

  def step(z, x_hat, a, b):
    a_a, s_a = _alpha_sigma(a)
    a_b, s_b = _alpha_sigma(b)
    at_data = (b <= 0)[:, None]
    a_b, s_b = jnp.where(at_data, 1.0, a_b), jnp.where(at_data, 0.0, s_b)
    eps = (z - a_a * x_hat) / s_a
    if solver == "ddim":
      return a_b * x_hat + s_b * eps
    c = a_b - a_a * s_b / s_a
    x_var = eta * jnp.mean(jnp.square(x_hat - x), -1, keepdims=True)
    scale = jnp.sqrt(jnp.square(s_b) + c * c * x_var / jnp.mean(jnp.square(eps), -1,
                                                                   keepdims=True))
    return a_b * x_hat + scale * eps

  z_mid = step(z_t, EXACT(z_t, t), t, t_mid)
  x_mid = EXACT(z_mid, t_mid)
  return step(z_mid, x_mid, t_mid, s), x_mid, z_mid


def _inverse_ddim(z_s, z_t, t, s):
  """The x with alpha_s x + sigma_s (z_t - alpha_t x) / sigma_t = z_s (s > 0)."""
  a_t, s_t = _alpha_sigma(t)
  a_s, s_s = _alpha_sigma(s)
  return (z_s - s_s / s_t * z_t) / (a_s - a_t * s_s / s_t)


def _batch(n_student, batch=200):
  x = MIX.sample(jax.random.PRNGKey(1), batch)[0]
  eps = jax.random.normal(jax.random.PRNGKey(2), x.shape)
  i = jnp.arange(batch, dtype=jnp.int32) % n_student  # every student step, i = 0 included
  t = (i + 1) / n_student
  a, s = _alpha_sigma(t)
  return x, eps, i, a * x + s * eps


@pytest.mark.parametrize("solver", ["ddim", "addim"])
def test_a_student_that_is_the_teachers_two_step_solve_has_zero_loss(solver):
  n = 4
  x, eps, i, z_t = _batch(n)
  z_s, x_mid, _ = _teacher_two_steps(z_t, x, i, n, solver)
  s = i / n
  safe_s = jnp.where(i == 0, 0.5 / n, s)  # the inverse is only used where s > 0
  solve = jnp.where((i == 0)[:, None], x_mid, _inverse_ddim(z_s, z_t, (i + 1) / n, safe_s))
  # The student is called on the batch's own z_t, so it may look its answer up.
  perfect = lambda z, t, rng: solve
  one_step = lambda z, t, rng: EXACT(z, t)  # the teacher's single step: not PD's target
  kw = dict(schedule=SCHEDULE, student_steps=n, teacher_fn=EXACT, teacher_solver=solver)
  zero, aux = losses.pd_loss(perfect, x, eps, i, None, **kw)
  wrong, _ = losses.pd_loss(one_step, x, eps, i, None, **kw)
  assert float(jnp.mean(wrong)) > 1e-3
  assert float(jnp.max(zero)) < 1e-6 * float(jnp.mean(wrong)), float(jnp.max(zero))
  np.testing.assert_allclose(aux["t"], (i + 1) / n, rtol=0, atol=1e-7)


@pytest.mark.parametrize("solver", ["ddim", "addim"])
def test_the_target_at_the_last_step_is_the_teachers_x_hat(solver):
  n = 4
  x, eps, i, z_t = _batch(n)
  z_s, x_mid, _ = _teacher_two_steps(z_t, x, i, n, solver)
  target, z_teacher = losses.pd_target(EXACT, x, z_t, i, schedule=SCHEDULE, student_steps=n,
                                       teacher_solver=solver)
  last = np.asarray(i == 0)
  np.testing.assert_allclose(target[last], x_mid[last], rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(z_teacher, z_s, rtol=1e-4, atol=1e-4)
  if solver == "addim":  # the aDDIM endpoint carries noise: the special case matters
    assert float(jnp.max(jnp.abs(z_teacher[last] - x_mid[last]))) > 1e-2


def test_the_loss_minimiser_samples_the_teachers_2n_steps_and_keeps_the_distribution():
  """The student that minimises one halving's loss (its x̂ is PD's target, DDIM teacher)
  samples in N DDIM steps what the teacher samples in 2N: the same points, and the
  true distribution within the noise floor of independent true samples."""
  n, num = 32, 4000
  student = lambda z, t: losses.pd_target(EXACT, z, z, jnp.round(t * n).astype(jnp.int32) - 1,
                                          schedule=SCHEDULE, student_steps=n,
                                          teacher_solver="ddim")[0]
  z1 = jax.random.normal(jax.random.PRNGKey(3), (num, 8))
  got = jax.jit(lambda z: sampling.sample_mcm(student, z, SCHEDULE, n))(z1)
  want = jax.jit(lambda z: sampling.sample(EXACT, z, SCHEDULE, 2 * n, "ddim"))(z1)
  np.testing.assert_allclose(got, want, rtol=0, atol=2e-3)
  truth = MIX.sample(jax.random.PRNGKey(4), num)[0]
  # The noise floor: the unbiased estimate scatters around 0 for samples of one distribution.
  noise = max(abs(energy.energy_distance(MIX.sample(k, num)[0], truth))
              for k in jax.random.split(jax.random.PRNGKey(5), 3))
  assert energy.energy_distance(got, truth) < 3 * noise, noise
  # The metric has the power to see a wrong distribution: one DDIM step.
  one = jax.jit(lambda z: sampling.sample(EXACT, z, SCHEDULE, 1, "ddim"))(z1)
  assert energy.energy_distance(one, truth) > 30 * noise


def test_staged_config_halves_n_and_chains_the_initialisation():
  c = file_config("configs/digits_pd.py:teacher=/t,start=16,halving_steps=100,compare=1/4")
  assert c.stage_order == ("pd8", "pd4", "pd2", "pd1", "cd1", "cd4")
  previous = "/t"
  for name, n in zip(c.stage_order[:4], (8, 4, 2, 1)):
    stage = c.stages[name]
    assert stage.loss.mode == "pd" and stage.loss.student_steps == n
    assert stage.init_from == stage.teacher_checkpoint == previous
    assert stage.num_train_steps == 100 and stage.ema_decays == (0.0,)
    previous = f"stage:{name}"
  # Equal compute: a CD student at S trains as long as the PD chain to S.
  assert c.stages.cd1.num_train_steps == 400 and c.stages.cd4.num_train_steps == 200
  assert c.stages.cd1.teacher_checkpoint == "/t"
  config_checks.validate_run(c, num_devices=8, num_processes=1)
  # Without a teacher, the diffusion model trains first.
  c = file_config("configs/mixture_pd.py:start=4")
  assert c.stage_order == ("teacher", "pd2", "pd1")
  assert c.stages.pd2.init_from == "stage:teacher"
  with pytest.raises(ValueError, match="power of two"):
    file_config("configs/digits_pd.py:teacher=/t,start=12")


@pytest.mark.parametrize("key,value", [("loss.boundaries", "karras"),
                                       ("loss.anystep_counts", (1, 2)),
                                       ("loss.pd_weighting", "huber"),
                                       ("loss.pd_midpoint_x_var", "none")])
def test_pd_config_errors_name_the_key(key, value):
  c = file_config("configs/mixture_pd.py:teacher=/t,start=4").stages.pd2
  section, leaf = key.split(".")
  c[section][leaf] = value
  with pytest.raises(config_checks.ConfigError, match=rf"^config\.{key} must"):
    config_checks.validate(c, num_devices=8, num_processes=1)


def test_pd_trains_through_the_staged_trainer_and_samples_on_its_n_steps(tmp_path):
  c = file_config("configs/mixture_pd.py:start=4,halving_steps=10")
  for name in c.stage_order:
    for key, value in {**TINY_MIXTURE, "checkpoint_every_steps": 10}.items():
      section, _, leaf = key.rpartition(".")
      (c.stages[name][section] if section else c.stages[name])[leaf] = value
  c.stages.teacher.num_train_steps = 10
  c.stages.pd1.optimizer.learning_rate = 0.0  # pd1 must then hold pd2's weights
  train.run(c, str(tmp_path))
  pd2, pd1 = runs.load_run(str(tmp_path / "pd2")), runs.load_run(str(tmp_path / "pd1"))
  assert pd1.config.teacher_checkpoint == str(tmp_path / "pd2")
  for a, b in zip(jax.tree.leaves(pd1.params), jax.tree.leaves(pd2.params)):
    np.testing.assert_array_equal(a, b)
  spec = pd2.sampler_spec()
  assert spec.kind == "mcm" and spec.steps == 2 and spec.boundaries == (0.0, 0.5, 1.0)
  assert spec.describe().startswith("PD student, 2 steps")
