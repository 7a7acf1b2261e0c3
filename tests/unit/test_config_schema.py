"""Every key of every shipped config against wrong values of every kind: each is refused in
one line naming the key and what is allowed, or is a value its schema row allows.

The values are set in the config's dict (as a config file could write them, past
ml_collections' type checks on the command line) and checked with `validate_run`, what
the main job runs first; a few go through `python -m multistep_cm.main` for the exit code.
"""
import glob
import math
import os

import ml_collections
import pytest

from multistep_cm.config import checks as config_checks

from helpers import file_config
from helpers import REPO
from helpers import run_main
import test_plan

# Single runs covering every key the shipped configs set: the digits pipeline's stages, the
# any-step stage of the digits study, the mixture's CD and Direct, ImageNet at both sizes.
CONFIGS = {
    "digits teacher": ("configs/digits_pipeline.py", "stages.teacher"),
    "digits cd4": ("configs/digits_pipeline.py", "stages.cd4"),
    "digits any-step": ("configs/digits_study.py:anystep=segment_start", "stages.cdany"),
    "mixture cd": ("configs/mixture_cd.py:teacher=/t", None),
    "mixture direct": ("configs/mixture_direct.py:teacher=/t", None),
    "imagenet64 cd": ("configs/imagenet64_cd.py:teacher=/t,guidance=0.5", None),
    "imagenet128 diffusion": ("configs/imagenet128_diffusion.py:size=large", None),
}
BAD_VALUES = {
    "wrong type": ["seven", 1.5, True, [1, 2], {"a": 1}, None],
    "negative": [-1, -0.5],
    "zero": [0, 0.0],
    "huge": [10**12, 1e30],
    "nan": [math.nan],
    "inf": [math.inf, -math.inf],
    "empty string": [""],
    "unknown name": ["no_such_name"],
    "wrong length": [(), tuple(range(100))],
}


def _single_run(path, stage):
  config = file_config(path)
  return config if stage is None else config[stage.split(".")[0]][stage.split(".")[1]]


def _with(tree, key, value):
  *parents, leaf = key.split(".")
  node = tree
  for parent in parents:
    node = node[parent]
  node[leaf] = value
  return ml_collections.ConfigDict(tree)


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_every_key_refuses_wrong_values_in_one_line(name):
  base = _single_run(*CONFIGS[name])
  config_checks.validate(base, num_devices=8, num_processes=1)  # as shipped: valid
  tried = refused = 0
  for key, _ in config_checks.leaves(base.to_dict()):
    rule = config_checks.rule_for(key)
    assert rule is not None, f"config.{key} has no row in the schema"
    for values in BAD_VALUES.values():
      for value in values:
        tried += 1
        config = _with(base.to_dict(), key, value)
        try:
          config_checks.validate(config, num_devices=8, num_processes=1)
        except config_checks.ConfigError as e:
          message = str(e)
          refused += 1
          assert "\n" not in message and message.startswith("config."), (key, value, message)
          assert key.rsplit(".", 1)[-1] in message, (key, value, message)
        else:  # accepted: then its row allows it
          assert rule.check(value) is None, (key, value)
  print(f"{name}: {tried} wrong values tried, {refused} refused in one line, "
        f"{tried - refused} allowed by the schema")
  assert refused > tried // 2


def test_a_key_no_row_names_is_refused():
  config = _single_run(*CONFIGS["mixture cd"])
  config.loss.boundary = "karras"  # a typo of loss.boundaries
  with pytest.raises(config_checks.ConfigError, match=r"config\.loss\.boundary is not a key"):
    config_checks.validate(config, num_devices=8, num_processes=1)


def test_suspicious_values_are_warned_about(caplog):
  config = _single_run(*CONFIGS["mixture cd"])
  config.optimizer.learning_rate = 3.0
  assert config_checks.check_keys(config) == [
      "config.optimizer.learning_rate: 3 is above 1, which is unusual"]
  config.ema_decays = (1.0,)
  with pytest.raises(config_checks.ConfigError, match=r"config\.ema_decays must be"):
    config_checks.check_keys(config)


@pytest.mark.parametrize("override,key", [
    ("--config.loss.boundaries=karras2", "config.loss.boundaries"),
    ("--config.loss.anystep_counts=(1,3)", "config.loss.anystep_counts"),
    ("--config.optimizer.learning_rate=nan", "config.optimizer.learning_rate"),
    # A typo of a nested key: named as typed, with ml_collections' suggestion, one line.
    ("--config.optimizer.lerning_rate=1e-3", "--config.optimizer.lerning_rate: the config has "
     "no key 'lerning_rate' (did you mean 'learning_rate'?)"),
])
def test_main_exits_2_with_one_line(tmp_path, override, key):
  proc = run_main("configs/mixture_ct.py", tmp_path / "run", None, override, check=False)
  assert proc.returncode == 2, proc.stderr[-2000:]
  lines = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
  assert len(lines) == 1 and key in lines[0], proc.stderr[-2000:]
  assert "Traceback" not in proc.stderr


def test_the_fuzzed_runs_cover_every_key_of_every_shipped_config():
  """The runs above hold every leaf key of every config file in configs/ (every stage of a
  staged one), so each of those keys is fuzzed; and every shipped value fits its row."""
  fuzzed = set()
  for name in CONFIGS:
    fuzzed |= {k for k, _ in config_checks.leaves(_single_run(*CONFIGS[name]).to_dict())}
  shipped = set()
  for path in sorted(glob.glob(os.path.join(REPO, "configs", "*.py"))):
    name = os.path.basename(path)
    if name in test_plan.NEEDS_PREPARED_DATA:
      continue  # validated on a folder it prepares: tests/unit/test_folder_config.py
    arg = "teacher=/t" if ("_cd" in name or "_direct" in name) else None  # they need one
    config = file_config(path if arg is None else f"{path}:{arg}")
    runs = [config.stages[s] for s in config.stage_order] if "stages" in config else [config]
    for run in runs:
      keys = {k for k, _ in config_checks.leaves(run.to_dict())}
      shipped |= keys
      config_checks.check_keys(run)  # raises ConfigError on a value outside its row
  assert shipped <= fuzzed, sorted(shipped - fuzzed)
