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


# The files that take minutes, longest first: pytest.ini runs the suite on two workers
# (pytest-xdist, one file per worker at a time, in collection order), and starting these
# first keeps one long file from running alone at the end. Measured with --durations.
_LONG_FILES = ("test_kill_storm.py", "test_t2i_demo.py", "test_sampling_eval.py",
               "test_without_tensorflow.py", "test_reliability.py", "test_toy.py",
               "test_train.py", "test_multihost.py")


def pytest_collection_modifyitems(session, config, items):
  del session, config
  rank = lambda item: (_LONG_FILES.index(item.path.name) if item.path.name in _LONG_FILES
                       else len(_LONG_FILES))
  items.sort(key=rank)  # stable: the order within a file, and of the other files, is kept
