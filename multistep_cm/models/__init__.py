"""Denoising networks: the simple-diffusion UViT and a residual MLP for vector data.

Build one with `get_model(preset_or_config, **overrides)`; every model is called
as `model.apply({'params': params}, z, logsnr, labels, train=False,
rngs={'dropout': key})` and returns v-hat with the shape of z, in float32.
"""
from multistep_cm.models.mlp import MLPBlock
from multistep_cm.models.mlp import MLPDenoiser
from multistep_cm.models.partitioning import LOGICAL_AXIS_RULES
from multistep_cm.models.presets import abstract_variables
from multistep_cm.models.presets import dummy_inputs
from multistep_cm.models.presets import get_model
from multistep_cm.models.presets import get_model_for_config
from multistep_cm.models.presets import init_kwargs
from multistep_cm.models.presets import input_specs
from multistep_cm.models.presets import PAPER_PARAMS
from multistep_cm.models.presets import param_count
from multistep_cm.models.presets import PRESETS
from multistep_cm.models.uvit import ResBlock
from multistep_cm.models.uvit import stack_layers
from multistep_cm.models.uvit import TransformerBlock
from multistep_cm.models.uvit import TransformerStack
from multistep_cm.models.uvit import unstack_layers
from multistep_cm.models.uvit import UViT
