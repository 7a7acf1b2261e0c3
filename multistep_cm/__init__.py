"""Multistep Consistency Models in JAX/Flax.

The package root holds the commands (`python -m multistep_cm.<name>`): `main` (training),
`sample`, `evaluate`, `compile_report` (will a step fit and how fast, compiled for a TPU
slice), `toy` (the exact-teacher mixture experiment), `sampler_comparison`, `t2i_demo`,
`convert` (published DiT, SiT and SD-VAE weights to Flax parameter files), and `api`,
the Python interface for notebooks and scripts (load a run, sample, grid, evaluate:
docs/notebooks/quickstart.py).

The libraries sit in folders named for their role, each importing only from those before
it (tests/unit/test_layout.py): `diffusion` (the maths, pure functions of arrays),
`models` (the UViT and MLP denoisers, presets, sharding rules, and the network as the
maths calls it), `teachers` (other models' teachers, in any frame and with any target, as
our denoisers), `data` (sources and the input pipeline), `runtime` (meshes, checkpoints,
metric events, chip peaks, the FLOP counter), `config` (defaults, checks and the
`RunPlan`), `sampling` (sharded sampling, runs read back, images), `evaluation` (sample
metrics, FID/IS, evaluation during training) and `training` (the host loop, the train
step, the optimiser).
"""

import os as _os

# TensorFlow only reads data and writes event files here; keep its C++ start-up chatter out
# of the logs unless the user asks for it.
_os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
_os.environ.setdefault("TF_ENABLE_ONEDNN_OPTS", "0")

__version__ = "0.1.0"
