"""`python -m multistep_cm.main` that also records the example ids each process feeds.

Used by test_multihost.py as the worker command, `python -m multihost_worker` with tests/
on the path (helpers.popen_module): it runs the real main job (same flags, same
`jax.distributed` start-up) and records the ids of the examples this process's input
pipeline yielded, one row per training step, in `$MCM_RECORD_DIR/indices_<process>.npy`
([steps, local batch] int64, rewritten at every step). The test reads them back to check
that each process read only its own rows of every global batch.
"""
import os

from absl import app
import numpy as np

from multistep_cm.data import pipeline
from multistep_cm import main


def _record_indices(directory: str):
  """Wraps `Pipeline.iterate` so every yielded batch's ids are saved before use."""
  iterate = pipeline.Pipeline.iterate

  def recording_iterate(self, start_step=0, num_steps=None):
    import jax  # pylint: disable=g-import-not-at-top
    path = os.path.join(directory, f"indices_{jax.process_index()}.npy")
    seen = []
    for batch in iterate(self, start_step, num_steps):
      seen.append(np.asarray(batch["index"]))
      # Rewritten at every step: the loop stops pulling batches without closing
      # the generator, so there is no later moment that is sure to run.
      np.save(path, np.stack(seen))
      yield batch

  pipeline.Pipeline.iterate = recording_iterate


if __name__ == "__main__":
  _record_indices(os.environ["MCM_RECORD_DIR"])
  app.run(main.main)
