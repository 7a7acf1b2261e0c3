"""The run's plan (config/plan.py): one resolution of a config, the same from a config file
and from a trained run's config.json and checkpoint metadata."""
import glob
import json
import os

import ml_collections
import numpy as np
import pytest

from multistep_cm.config import base as config_base
from multistep_cm.config import plan as plan_lib
from multistep_cm.diffusion import losses
from helpers import file_config

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _runs_of(path: str):
  """`(name, config)` of every run a config file describes (each stage of a staged one),
  the teacher path set where the objective needs one."""
  config = file_config(os.path.relpath(path, REPO))
  stages = ([(n, config.stages[n]) for n in config.stage_order] if "stages" in config
            else [("", config)])
  for name, stage in stages:
    stage = ml_collections.ConfigDict(stage.to_dict())
    if stage.loss.mode in losses.TEACHER_MODES:
      stage.teacher_checkpoint = "/teacher"
    yield f"{os.path.basename(path)}{':' + name if name else ''}", stage


def as_written(plan: plan_lib.RunPlan, config=None):
  """What the trainer leaves in a workdir, read back: `(config.json, checkpoint metadata)`."""
  config = plan.config if config is None else config
  return (ml_collections.ConfigDict(json.loads(config.to_json_best_effort())),
          json.loads(json.dumps(plan.checkpoint_meta(7))))


# Configs that read a prepared dataset to build (tests/unit/test_folder_config.py
# round-trips them on one it prepares).
NEEDS_PREPARED_DATA = ("folder_pipeline.py",)


def test_every_config_file_round_trips_through_the_workdir():
  """`from_run(config.json, meta) == from_config(config)` for every run of every config."""
  checked = 0
  for path in sorted(glob.glob(os.path.join(REPO, "configs", "*.py"))):
    if os.path.basename(path) in NEEDS_PREPARED_DATA:
      continue
    for name, config in _runs_of(path):
      plan = plan_lib.RunPlan.from_config(config)
      assert plan_lib.RunPlan.from_run(*as_written(plan)) == plan, name
      # config.json as the trainer wrote it before defaults were filled reads the same.
      assert plan_lib.RunPlan.from_run(*as_written(plan, config)) == plan, name
      checked += 1
  assert checked >= 24


def test_an_older_run_resolves_with_the_defaults():
  """A config.json without the keys added later, and metadata without the stored
  boundaries and guidance range, resolve as the defaults say: one step count, equal
  segments (all that could be trained then), no guidance input."""
  config = config_base.digits_config("cd", student_steps=4, teacher="/teacher")
  plan = plan_lib.RunPlan.from_config(config)
  old, meta = as_written(plan)
  for section, key in (("loss", "anystep_counts"), ("loss", "anystep_probs"),
                       ("loss", "guidance_range"), ("model", "guidance_cond"),
                       ("model", "segment_cond"), ("data", "fast_decode")):
    del old[section][key]
  del old["evals"]
  del meta["segment_boundaries"], meta["guidance_range"]
  again = plan_lib.RunPlan.from_run(old, meta)
  assert again == plan
  assert again.step_counts == (4,) and again.boundaries == {4: (0.0, 0.25, 0.5, 0.75, 1.0)}
  assert again.guidance_range is None and again.config.evals.every_steps == 0


def test_stored_boundaries_are_what_the_student_samples_with():
  config = config_base.mixture_config("cd", 4)
  config.teacher_checkpoint = "/teacher"
  config.loss.boundaries = "karras"
  plan = plan_lib.RunPlan.from_config(config)
  bounds = plan.boundaries[4]
  n = config.loss.teacher_steps_end  # snapped to the final teacher grid
  np.testing.assert_allclose(np.asarray(bounds) * n, np.round(np.asarray(bounds) * n),
                             atol=1e-6)
  assert bounds[0] == 0 and bounds[-1] == 1 and bounds != (0.0, 0.25, 0.5, 0.75, 1.0)
  spec = plan.sampler()
  assert (spec.kind, spec.steps, spec.boundaries, spec.step_index) == ("mcm", 4, bounds, 0)
  # A run whose checkpoint stored other boundaries samples with those.
  meta = plan.checkpoint_meta(1)
  meta["segment_boundaries"] = {"4": [0.0, 0.1, 0.2, 0.6, 1.0]}
  assert plan_lib.RunPlan.from_run(config, meta).sampler().boundaries == (0.0, 0.1, 0.2,
                                                                          0.6, 1.0)


def test_the_sampler_of_each_kind_of_run():
  diffusion = plan_lib.RunPlan.from_config(config_base.digits_config("diffusion"))
  spec = diffusion.sampler()
  assert (spec.kind, spec.steps) == (diffusion.config.sample_sampler,
                                     diffusion.config.sample_steps)
  assert diffusion.sampler(16, sampler="heun", spacing="karras").nfe == 31
  assert diffusion.step_counts == () and diffusion.student_steps is None

  anystep = config_base.mixture_config("ct", 4)
  config_base.set_anystep(anystep, (1, 2, 4))
  plan = plan_lib.RunPlan.from_config(anystep)
  assert plan.student_steps == 4 and plan.step_counts == (1, 2, 4)
  spec = plan.sampler(2)
  assert (spec.steps, spec.step_index, spec.boundaries) == (2, 1, (0.0, 0.5, 1.0))
  with pytest.raises(ValueError, match="any-step"):
    plan.sampler()  # an any-step student is told which of its counts
  with pytest.raises(ValueError, match="applies to diffusion"):
    plan.sampler(2, sampler="heun")

  pd = plan_lib.RunPlan.from_config(config_base.mixture_config("pd", 2))
  assert pd.sampler().student == "PD student" and pd.objective.teacher_objectives == (
      plan_lib.Objective.DIFFUSION, plan_lib.Objective.PD)
  with pytest.raises(ValueError, match="2-step"):
    pd.sampler(4)


def test_a_guidance_conditioned_student_is_told_w_within_its_range():
  config = config_base.digits_config("cd", student_steps=2, teacher="/teacher")
  config.loss.guidance_range = (1.0, 3.0)
  config.model.guidance_cond = True
  plan = plan_lib.RunPlan.from_config(config)
  assert plan.guidance_range == (1.0, 3.0)
  assert plan.sampler().guidance == 1.0 and plan.sampler().guidance_input
  assert plan.sampler(guidance=2.5).guidance == 2.5
  with pytest.raises(ValueError, match=r"outside \[1, 3\]"):
    plan.sampler(guidance=4.0, name="/runs/student")


def test_the_plan_is_read_only_and_knows_every_objective():
  plan = plan_lib.RunPlan.from_config(config_base.digits_config("diffusion"))
  with pytest.raises((AttributeError, TypeError)):
    plan.config.loss.mode = "cd"
  assert {o.value for o in plan_lib.Objective} == {"diffusion", *losses.MODES}
  assert {o.value for o in plan_lib.Objective if o.needs_teacher} == set(losses.TEACHER_MODES)
  assert {o.value for o in plan_lib.Objective if o.is_mcm} == set(losses.MCM_MODES)


def test_with_defaults_fills_missing_keys_and_keeps_given_ones():
  partial = ml_collections.ConfigDict({"seed": 3, "loss": {"mode": "ct", "eta": 0.5}})
  full = config_base.with_defaults(partial)
  base = config_base.base_config()
  assert full.seed == 3 and full.loss.eta == 0.5 and full.loss.mode == "ct"
  assert full.loss.teacher_steps_end == base.loss.teacher_steps_end
  assert full.evals.to_dict() == base.evals.to_dict()
  assert "seed" in partial and "evals" not in partial  # the input is not changed
