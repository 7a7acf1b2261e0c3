"""Multistep Consistency Models in JAX/Flax.

Subpackages: `diffusion` (schedules, solvers, samplers, losses: pure maths),
`models` (UViT and MLP denoisers); the trainer, input pipeline, checkpoints
and evaluation sit beside them, one module per concern.
"""

import os as _os

# TensorFlow only reads data and writes event files here; keep its C++ start-up chatter out
# of the logs unless the user asks for it.
_os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
_os.environ.setdefault("TF_ENABLE_ONEDNN_OPTS", "0")

__version__ = "0.1.0"
