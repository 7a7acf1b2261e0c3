"""Peak dense bfloat16 FLOP/s per chip, for MFU in logs, benchmarks and compile reports.

Vendor figures for dense (not sparse) bf16 matrix math, per chip (a TPU v4/v5p
chip has two TensorCores; the figure covers both). `jax.Device.device_kind`
strings map to them; unknown devices (e.g. CPUs) give None, and the benchmarks
measure the CPU's own matmul rate instead.
"""
import jax

# (substring of device_kind, lower-cased) -> (name, peak bf16 FLOP/s, HBM bytes)
_PEAKS = (
    ("tpu v6 lite", ("TPU v6e", 918e12, 32 * 2**30)),
    ("tpu v6e", ("TPU v6e", 918e12, 32 * 2**30)),
    ("tpu v5 lite", ("TPU v5e", 197e12, 16 * 2**30)),
    ("tpu v5e", ("TPU v5e", 197e12, 16 * 2**30)),
    ("tpu v5p", ("TPU v5p", 459e12, 95 * 2**30)),
    ("tpu v5", ("TPU v5p", 459e12, 95 * 2**30)),
    ("tpu v4", ("TPU v4", 275e12, 32 * 2**30)),
    ("h200", ("NVIDIA H200", 989e12, 141 * 10**9)),
    ("h100", ("NVIDIA H100", 989e12, 80 * 10**9)),
    ("a100", ("NVIDIA A100", 312e12, 80 * 10**9)),
)


def chip_spec(device_kind: str):
  """`(name, peak_flops, hbm_bytes)` for a device kind, or None when unknown."""
  kind = device_kind.lower()
  for key, spec in _PEAKS:
    if key in kind:
      return spec
  return None


def peak_flops_per_device(device: jax.Device | None = None) -> float | None:
  spec = chip_spec((device or jax.devices()[0]).device_kind)
  return spec[1] if spec else None
