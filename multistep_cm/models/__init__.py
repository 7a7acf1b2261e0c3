"""Denoising networks: the simple-diffusion UViT (`uvit.py`) and a residual MLP for vector
data (`mlp.py`), EDM's ADM UNet with its preconditioning, a teacher to distil
(`adm.py`, converted from EDM's state dict), DiT and SiT (`dit.py`) and the SD VAE
(`vae.py`), converted from their published weights, their shared layers (`layers.py`), presets at
the paper's sizes
(`presets.py`), the logical-axis sharding rules (`partitioning.py`) and the `summary`
command (`summary.py`); and the network as the maths calls it: `denoiser.py` (a
v-predicting network as `x̂ = f(z, t)`, with guidance and segment conditioning) and
`conditioning.py` (what a model is conditioned on, as one pytree).

Build one with `get_model(preset_or_config, **overrides)`; every model is called
as `model.apply({'params': params}, z, logsnr, labels, train=False,
rngs={'dropout': key})` and returns v-hat with the shape of z, in float32.
"""
from multistep_cm.models.presets import abstract_variables
from multistep_cm.models.presets import dummy_inputs
from multistep_cm.models.presets import get_model
from multistep_cm.models.presets import get_model_for_config
from multistep_cm.models.presets import init_kwargs
from multistep_cm.models.presets import input_specs
from multistep_cm.models.presets import PAPER_PARAMS
from multistep_cm.models.presets import param_count
from multistep_cm.models.presets import PRESETS
