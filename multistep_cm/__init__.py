"""Multistep Consistency Models in JAX/Flax.

Subpackages: `diffusion` (schedules, solvers, samplers, losses: pure maths),
`models` (UViT and MLP denoisers); the trainer, input pipeline, checkpoints
and evaluation sit beside them, one module per concern.
"""

__version__ = "0.1.0"
