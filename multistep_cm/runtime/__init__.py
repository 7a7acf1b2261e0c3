"""What training and sampling both stand on: devices, checkpoints, metrics, accounting.

Modules: `sharding` (the device meshes and the shardings of arrays and train state),
`checkpointing` (orbax checkpoints with per-array checksums, quarantine of corrupt steps),
`metric_log` (TensorBoard events through clu or tensorboardX, progress and profiler hooks),
`hardware` (chip peaks and HBM), `flops` (the one FLOP counter: matmuls and convolutions
on the jaxpr).
"""
