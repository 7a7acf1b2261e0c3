"""Sampling a trained run: the sharded sampler, runs read back, prompts and images.

Modules: `generation` (many examples sampled over every device and host; `SamplerSpec`,
the aDDIM x_var table), `runs` (a trained run read back from its workdir), `prompts` (the
captions a text model is sampled with), `images` (samples as uint8, grids and PNG files),
`inputs` (what a command is told: one-line refusals with the documented exit codes).
"""
