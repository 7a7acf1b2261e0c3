"""`python -m without_tensorflow MODULE ARGS...`: runs `python -m MODULE ARGS...` with
TensorFlow and TensorFlow Datasets unimportable, as on a GPU image with JAX alone."""
import runpy
import sys

for _name in ("tensorflow", "tensorflow_datasets"):
  sys.modules[_name] = None  # `import tensorflow` now raises ImportError

if __name__ == "__main__":
  _module = sys.argv[1]
  sys.argv = [_module] + sys.argv[2:]
  runpy.run_module(_module, run_name="__main__", alter_sys=True)
