"""The device meshes and the shardings of the train state and batches.

The trainer's mesh (`make_mesh`) has two axes, ('data', 'fsdp'): the batch is split
over both (every device holds a slice of it) and parameters, EMA copies and optimiser
moments are sharded over 'fsdp' by the models' logical axis rules
(models/partitioning.py). `fsdp = 1` is plain data parallelism; `data = 1` is full
FSDP. Samplers and the FID statistics, which replicate their parameters, split their
batch over `data_mesh`, one 'data' axis over every device.

Every axis is of type `AxisType.Auto`: the layers leave it to XLA's sharding
propagation to all-gather FSDP-sharded weights. With `Explicit` axes (the default of
`jax.make_mesh` in recent JAX) a matmul between a batch-sharded activation and an
'fsdp'-sharded kernel is a type error.
"""
import jax
from jax.experimental import mesh_utils
from jax.sharding import AxisType
from jax.sharding import Mesh
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P
import numpy as np
import optax

from multistep_cm.models import partitioning

MESH_AXES = ("data", "fsdp")


def mesh_shape(mesh_config, num_devices: int) -> tuple[int, int]:
  """`(data, fsdp)` from a config with `data` and `fsdp`, one of which may be -1 (the rest)."""
  data, fsdp = int(mesh_config.data), int(mesh_config.fsdp)
  if data == -1 and fsdp == -1:
    raise ValueError("config.mesh: at most one of data and fsdp may be -1")
  if data == -1:
    data = num_devices // fsdp if fsdp > 0 and num_devices % fsdp == 0 else 0
  if fsdp == -1:
    fsdp = num_devices // data if data > 0 and num_devices % data == 0 else 0
  if data < 1 or fsdp < 1 or data * fsdp != num_devices:
    raise ValueError(f"config.mesh: data x fsdp must equal the {num_devices} devices, got "
                     f"data={mesh_config.data}, fsdp={mesh_config.fsdp}")
  return data, fsdp


def make_mesh(mesh_config, devices=None) -> Mesh:
  """The ('data', 'fsdp') mesh of `config.mesh` over `devices` (default: all of them)."""
  devices = jax.devices() if devices is None else devices
  shape = mesh_shape(mesh_config, len(devices))
  try:
    grid = mesh_utils.create_device_mesh(shape, devices)
  except (ValueError, AssertionError, NotImplementedError):
    # Physical-topology placement is only known for TPUs and GPUs; fall back to id order.
    grid = np.asarray(devices, dtype=object).reshape(shape)
  return Mesh(grid, MESH_AXES, axis_types=(AxisType.Auto,) * len(MESH_AXES))


def data_mesh(devices=None) -> Mesh:
  """One 'data' axis over `devices` (default: all of them): for batch-parallel work with
  replicated parameters (sampling, FID statistics)."""
  devices = jax.devices() if devices is None else devices
  return Mesh(np.asarray(devices, dtype=object), ("data",), axis_types=(AxisType.Auto,))


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def batch_sharding(mesh: Mesh, ndim: int) -> NamedSharding:
  return partitioning.batch_sharding(mesh, ndim)


def optimizer_state_shardings(tx: optax.GradientTransformation, abstract_opt_state,
                              param_shardings, mesh: Mesh):
  """Moments get their parameter's sharding; scalars (step counts) are replicated."""
  return optax.tree_utils.tree_map_params(
      tx, lambda _, sharding: sharding, abstract_opt_state, param_shardings,
      transform_non_params=lambda _: replicated(mesh))
