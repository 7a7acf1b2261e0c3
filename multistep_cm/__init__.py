"""Multistep Consistency Models in JAX/Flax.

Subpackages: `diffusion` (the maths, pure functions of arrays), `models` (the UViT and
MLP denoisers, presets, sharding rules), `data` (sources and the input pipeline),
`evaluation` (sample metrics, FID/IS, evaluation during training).

Beside them, one module per concern:
  * commands (`python -m multistep_cm.<name>`): `main` (training), `sample`, `evaluate`,
    `compile_report`, `toy`, `sampler_comparison`;
  * training: `train` (the host loop, imported by `main` alone), `train_step` (the
    static step and train state), `checkpointing`, `optim`, `sharding`, `metric_log`
    (TensorBoard events and progress);
  * configs: `config_base` (defaults), `config_build` (what a config builds),
    `config_checks` (validation);
  * sampling: `denoiser` (network -> x̂), `generation` (sharded sampling), `runs` (a
    trained run read back), `images` (grids and PNG files);
  * accounting: `flops` (the FLOP counter), `hardware` (chip peaks and HBM).
"""

import os as _os

# TensorFlow only reads data and writes event files here; keep its C++ start-up chatter out
# of the logs unless the user asks for it.
_os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
_os.environ.setdefault("TF_ENABLE_ONEDNN_OPTS", "0")

__version__ = "0.1.0"
