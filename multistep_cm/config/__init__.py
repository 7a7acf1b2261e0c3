"""What a run is: its config's defaults, what it builds, its checks, and the plan.

Modules: `base` (the defaults, every key documented, and the experiment families the
config files call), `build` (what a config builds: schedule, model, data source, example
shape, step counts, segment boundaries), `checks` (validation of every key before anything
compiles, one line per refusal), `plan` (`RunPlan`: a validated config resolved once into
the frozen object that everything below `main` takes), `sampler` (`SamplerSpec`: how samples
are drawn, named).
"""
