"""The compile report: its arithmetic on a CPU compile, and a TPU compile (the FLOP counter
it uses is tested in tests/unit/test_flops.py).

The TPU test needs libtpu (`pip install -e '.[tpu]'`) and is skipped without it; the
others compile for this host's CPU devices.
"""
import importlib.util
import json

import numpy as np
import pytest

from multistep_cm import compile_report
from multistep_cm.runtime import hardware

from helpers import run_module
from helpers import tiny_mixture


def test_topology_names():
  assert compile_report.topology_name("v5e-256") == "v5e:16x16"
  assert compile_report.topology_name("v5litepod-64") == "v5e:8x8"
  assert compile_report.topology_name("v6e-8") == "v6e:2x4"
  assert compile_report.topology_name("v5e:4x8") == "v5e:4x8"
  with pytest.raises(compile_report.TopologyError, match="v5e-N"):
    compile_report.topology_name("v5e-3")


def _check_arithmetic(r, steps_per_sec, peak):
  x = r["xla_bytes"]
  assert r["total_bytes"] == x["argument"] + x["temp"] + x["output"] - x["alias"] + x["program"]
  # Donation: the new state takes the old state's buffers.
  state = sum(r["args_bytes"][k] for k in ("params", "opt_state", "ema", "counters"))
  assert 0 < x["alias"] and x["alias"] >= state * 0.99
  assert r["fits"] == (r["total_bytes"] <= r["hbm_bytes"])
  assert r["args_bytes"]["teacher"] > 0 and r["args_bytes"]["params"] > 0
  assert r["model_flops_per_chip"] > 0 and r["xla_flops_per_chip"] > 0
  assert r["mfu"] == pytest.approx(r["model_flops_per_chip"] * steps_per_sec / peak)
  assert r["hfu"] == pytest.approx(r["hardware_flops_per_chip"] * steps_per_sec / peak)


def test_report_arithmetic_on_a_cpu_compile(monkeypatch):
  fake_chip = ("test chip", 1e12, 2**30)
  monkeypatch.setattr(hardware, "chip_spec", lambda kind: fake_chip)
  r = compile_report.build_report(tiny_mixture("cd"), "cpu", steps_per_sec=10.0)
  assert (r["chips"], r["mesh"]) == (8, {"data": 2, "fsdp": 4})
  # On the CPU, XLA's argument bytes are the shards' bytes, but for the labels: the
  # mixture is unconditional, and jit drops arguments the step never reads.
  labels = 64 // 8 * 4
  assert sum(r["args_bytes"].values()) - labels == r["xla_bytes"]["argument"]
  _check_arithmetic(r, 10.0, fake_chip[1])
  assert r["fits"]
  text = compile_report.format_report(r)
  for word in ("args/teacher", "temporaries", "aliased", "total", "model FLOPs/step", "MFU"):
    assert word in text, word


@pytest.mark.skipif(importlib.util.find_spec("libtpu") is None,
                    reason="compiling for a TPU topology needs libtpu: pip install -e '.[tpu]'")
def test_report_compiles_for_a_tpu_slice_on_this_host(tmp_path):
  out = tmp_path / "report.json"
  # The CPU's own device count (devices=None): the step is compiled for the 4 TPU chips.
  proc = run_module("multistep_cm.compile_report", "--config=configs/mixture_cd.py",
                    "--topology=v5e-4", "--steps_per_sec=100", f"--json={out}",
                    "--config.batch_size=64", "--config.model.width=32",
                    "--config.model.depth=2", "--config.mesh.data=1", "--config.mesh.fsdp=-1",
                    devices=None, timeout=300)
  r = json.loads(out.read_text())
  assert (r["topology"], r["chips"], r["device_kind"]) == ("v5e:2x2", 4, "TPU v5 lite")
  assert r["mesh"] == {"data": 1, "fsdp": 4}
  name, peak, hbm = hardware.chip_spec(r["device_kind"])
  assert (name, r["hbm_bytes"], r["peak_flops"]) == ("TPU v5e", hbm, peak)
  _check_arithmetic(r, 100.0, peak)
  assert r["fits"] and "fits" in proc.stdout and "DOES NOT FIT" not in proc.stdout
  np.testing.assert_allclose(r["steps_per_sec"], 100.0)
