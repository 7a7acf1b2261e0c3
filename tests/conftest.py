"""Test session set-up: 8 simulated CPU devices, quiet TensorFlow.

XLA reads its flags when the backend starts, so they are set here, before any
test module imports jax.
"""
import os
import tempfile

os.environ.setdefault("JAX_PLATFORMS", "cpu")
_flags = os.environ.get("XLA_FLAGS", "")
if "xla_force_host_platform_device_count" not in _flags:
  os.environ["XLA_FLAGS"] = (_flags + " --xla_force_host_platform_device_count=8").strip()
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
# The digits classifier is trained once per session into a private cache, not ~/.cache.
os.environ.setdefault("MULTISTEP_CM_CACHE", tempfile.mkdtemp(prefix="mcm_cache_"))
