"""The train state: everything an exact resume needs besides the input position (= step)."""
from typing import Any

import flax
import jax
import jax.numpy as jnp


@flax.struct.dataclass
class TrainState:
  """Step, rng, parameters, optimiser state, EMA copies and non-finite-update counters.

  The teacher is not here: teachers are inputs, never optimised or checkpointed
  with the student.
  """
  step: jax.Array  # int32: the number of updates applied (also the next data step)
  rng: jax.Array  # uint32[2]: per-step keys are folded from it with the step number
  params: Any
  opt_state: Any
  ema: dict[str, Any]  # {"ema0": params-like, ...}, one per config.ema_decays
  num_skipped: jax.Array  # int32: updates skipped because the loss or gradient was non-finite
  first_nonfinite_step: jax.Array  # int32: the first such step (as logged, 1-based), -1 if none

  def counters(self) -> dict[str, jax.Array]:
    return {"step": self.step, "rng": self.rng, "num_skipped": self.num_skipped,
            "first_nonfinite_step": self.first_nonfinite_step}


def create(params, tx, rng, num_ema: int) -> TrainState:
  return TrainState(step=jnp.int32(0), rng=rng, params=params, opt_state=tx.init(params),
                    ema={f"ema{i}": params for i in range(num_ema)},
                    num_skipped=jnp.int32(0), first_nonfinite_step=jnp.int32(-1))
