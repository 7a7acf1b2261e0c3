"""Any-step students and configurable boundaries: conditioning, initialisation, sampling."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from multistep_cm.config import base as config_base
from multistep_cm.config import checks as config_checks
from multistep_cm.diffusion import sampling
from multistep_cm.diffusion import schedules
from multistep_cm import models
from multistep_cm.models import partitioning
from multistep_cm.runtime import checkpointing
from multistep_cm.sampling import generation
from multistep_cm.sampling import runs
from multistep_cm.training import loop as train
from multistep_cm.training import step as train_step

from helpers import abstract_params
from helpers import tiny_mixture


@pytest.mark.parametrize("cond,segment", [("steps", jnp.array([0, 2, 1, 0])),
                                          ("segment_start", jnp.array([15.0, 0.3, -4.0, 2.0]))])
def test_segment_conditioning_starts_as_the_base_model(cond, segment):
  """Zero-initialised: with the base model's parameters, any segment gives its output."""
  base = models.get_model("mlp_toy", width=32, depth=2)
  student = models.get_model("mlp_toy", width=32, depth=2, segment_cond=cond, num_step_values=3)
  params = partitioning.unbox(student.init({"params": jax.random.PRNGKey(0)},
                                           *models.dummy_inputs(student, 4),
                                           **models.init_kwargs(student, 4))["params"])
  new = "steps_embed" if cond == "steps" else "segment_dense"
  for leaf in jax.tree.leaves(params["cond"][new]):
    np.testing.assert_array_equal(leaf, 0.0)
  # Random, non-zero base weights (the output layer is zero-initialised).
  leaves, tree = jax.tree.flatten(params)
  keys = jax.random.split(jax.random.PRNGKey(1), len(leaves))
  params = jax.tree.unflatten(tree, [0.1 * jax.random.normal(k, l.shape) for k, l in
                                     zip(keys, leaves)])
  params["cond"][new] = jax.tree.map(jnp.zeros_like, params["cond"][new])  # as initialised
  base_params = {k: v for k, v in params.items()}
  base_params["cond"] = {k: v for k, v in params["cond"].items() if k != new}
  z, logsnr = jax.random.normal(jax.random.PRNGKey(2), (4, 8)), jnp.linspace(-5, 5, 4)
  want = base.apply({"params": base_params}, z, logsnr, None)
  got = student.apply({"params": params}, z, logsnr, None, segment=segment)
  np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-6)
  # Once the new weights move, the segment matters.
  params["cond"][new] = jax.tree.map(
      lambda v: 0.5 * jax.random.normal(jax.random.PRNGKey(3), v.shape), params["cond"][new])
  moved = student.apply({"params": params}, z, logsnr, None, segment=segment)
  other = student.apply({"params": params}, z, logsnr, None, segment=segment[::-1])
  assert not np.allclose(moved, other)


def test_anystep_student_initialised_from_a_diffusion_checkpoint(tmp_path):
  teacher = str(tmp_path / "teacher")
  train.train_and_evaluate(tiny_mixture("diffusion", steps=10), teacher)
  config = config_base.set_anystep(tiny_mixture("ct", steps=1, teacher=teacher), (1, 2, 4),
                                   "segment_start")
  config.optimizer.learning_rate = 0.0
  train.train_and_evaluate(config, str(tmp_path / "any"))
  t_ckpt, t_step = checkpointing.resolve(teacher)
  teacher_params = t_ckpt.restore_params(t_step, abstract_params(tiny_mixture()), "ema0")
  run = runs.load_run(str(tmp_path / "any"), "params")
  for path, value in jax.tree_util.tree_leaves_with_path(teacher_params):
    node = run.params
    for key in path:
      node = node[key.key]
    np.testing.assert_allclose(np.asarray(node), np.asarray(value), rtol=1e-6, atol=1e-7)
  np.testing.assert_array_equal(
      jax.tree.leaves(run.params["cond"]["segment_dense"])[0], 0.0)
  assert run.step_counts == (1, 2, 4)
  # The sampler asks for a step count the run was trained for.
  with pytest.raises(ValueError, match="any-step"):
    run.sampler_spec(8)
  spec = run.sampler_spec(2)
  assert spec.steps == 2 and spec.step_index == 1 and spec.boundaries == (0.0, 0.5, 1.0)
  out, _ = generation.generate(run.model, run.params, run.schedule, spec, 8)
  assert out.shape == (8, 8) and np.all(np.isfinite(out))


def test_checkpoint_stores_the_boundaries_sampling_uses(tmp_path):
  teacher = str(tmp_path / "teacher")
  train.train_and_evaluate(tiny_mixture("diffusion", steps=10), teacher)
  config = tiny_mixture("cd", steps=2, teacher=teacher, student_steps=4)
  config.loss.boundaries = "karras"
  train.train_and_evaluate(config, str(tmp_path / "cd"))
  run = runs.load_run(str(tmp_path / "cd"))
  stored = run.boundaries(4)
  # Snapped to the final teacher grid (teacher_steps_end = 16 in the tiny config).
  np.testing.assert_allclose(np.asarray(stored) * 16, np.round(np.asarray(stored) * 16),
                             atol=1e-6)
  assert stored[0] == 0 and stored[-1] == 1 and stored != (0.0, 0.25, 0.5, 0.75, 1.0)
  spec = run.sampler_spec()
  assert spec.boundaries == stored and "boundaries" in spec.describe()


def test_sampling_walks_the_given_boundaries_and_passes_segment_starts():
  schedule = schedules.cosine()
  bounds = (0.0, 0.3, 0.8, 1.0)

  def f(z, t, t_step):  # x̂ = t + 10 t_step, whatever z
    return jnp.broadcast_to((t + 10 * t_step)[:, None], z.shape)

  z = jnp.ones((2, 3))
  out = sampling.sample_mcm(f, z, schedule, 3, bounds, segment_aware=True)
  # A step to t = 0 returns its x̂: the last step, from t = 0.3 with segment start 0, gives
  # 0.3 + 10 * 0 (equal segments would end from t = 1/3; passing t for t_step, 3.3).
  np.testing.assert_allclose(out, 0.3, rtol=1e-6)
  plain = sampling.sample_mcm(lambda z, t: jnp.broadcast_to(t[:, None], z.shape), z, schedule,
                              3, bounds)
  np.testing.assert_allclose(plain, 0.3, rtol=1e-6)
  with pytest.raises(ValueError, match="student_steps"):
    sampling.sample_mcm(f, z, schedule, 2, bounds)


def test_anystep_shares_draw_each_count_that_often():
  """`loss.anystep_probs`: each step count's share of the batch, given in any order
  with its counts; equal shares when empty."""
  config = config_base.set_anystep(tiny_mixture("cd", steps=1, teacher="/t"), (8, 1, 4, 2),
                                   probs=(0.4, 0.1, 0.3, 0.2))
  assert tuple(config.loss.anystep_counts) == (1, 2, 4, 8)
  assert tuple(config.loss.anystep_probs) == (0.1, 0.2, 0.3, 0.4)
  config_checks.validate(config, 8, 1)
  schedule = schedules.get_schedule("cosine")
  n = 40_000
  grid, choice = train_step.segment_grid_fn(config, schedule)(jnp.float32(64),
                                                              jax.random.PRNGKey(0), n)
  np.testing.assert_array_equal(grid.student_steps, np.asarray([1, 2, 4, 8])[np.asarray(choice)])
  freq = np.bincount(np.asarray(choice), minlength=4) / n
  p = np.asarray([0.1, 0.2, 0.3, 0.4])
  assert np.all(np.abs(freq - p) < 5 * np.sqrt(p * (1 - p) / n)), freq
  # Refused in one ConfigError each: a share per count, positive, summing to one, and
  # only with several counts.
  for probs, match in [((0.5, 0.5), "one probability per count"),
                       ((0.0, 0.5, 0.25, 0.25), "positive and sum to 1"),
                       ((0.3, 0.3, 0.3, 0.3), "positive and sum to 1")]:
    config.loss.anystep_probs = probs
    with pytest.raises(config_checks.ConfigError, match=match):
      config_checks.validate(config, 8, 1)
  single = tiny_mixture("cd", steps=2, teacher="/t")
  single.loss.anystep_probs = (1.0,)
  with pytest.raises(config_checks.ConfigError, match="needs loss.anystep_counts"):
    config_checks.validate(single, 8, 1)
