"""Training: the host loop, the static train step and the optimiser.

Modules: `loop` (the host loop, `train_and_evaluate(config, workdir)` and staged runs;
imported by `main` alone), `step` (the train state, its sharded layout, the loss and update
compiled as one program with explicit shardings and donation), `optim` (the optimiser, its
learning-rate schedule and the EMA).
"""
