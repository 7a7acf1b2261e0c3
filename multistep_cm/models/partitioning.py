"""Logical axis names of the models' parameters and activations, and their mesh shardings.

Every parameter is created with logical axis names (`layers.py`); the rules
below map them onto a mesh with axes ('data', 'fsdp'):
- activations: 'batch' -> ('data', 'fsdp'), every other axis replicated;
- parameters (FSDP): each weight has exactly one axis named 'embed' (the
  residual width) or 'cond' (the conditioning width), sharded over 'fsdp';
  everything else ('layers' of the scanned stack included) is replicated.
A dimension that the mesh axis does not divide is replicated instead, so any
preset works on any mesh.

The mesh axes must be of type `AxisType.Auto` (runtime/sharding.py: `make_mesh` builds them so):
the layers leave it to XLA's sharding propagation to all-gather FSDP-sharded weights.
"""
from typing import Any, Sequence

import flax.linen as nn
import jax
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec

Rules = Sequence[tuple[str, str | tuple[str, ...] | None]]

LOGICAL_AXIS_RULES: tuple[tuple[str, str | tuple[str, ...] | None], ...] = (
    ("batch", ("data", "fsdp")),
    ("embed", "fsdp"),
    ("cond", "fsdp"),
    ("layers", None),
    ("fan_in", None),
    ("qkv", None),
    ("heads", None),
    ("mlp", None),
    ("modulation", None),
    ("cond_in", None),
    ("vocab", None),
    ("text", None),  # the text encoder's width D; its projections' outputs are 'embed'/'cond'
    ("channels", None),
    ("norm", None),
)


def unbox(tree: Any) -> Any:
  """Strips `nn.LogicallyPartitioned` boxes so trainer code sees plain arrays."""
  return nn.meta.unbox(tree)


def logical_to_spec(names: Sequence[str | None], shape: Sequence[int], mesh: jax.sharding.Mesh,
                    rules: Rules = LOGICAL_AXIS_RULES) -> PartitionSpec:
  """PartitionSpec for an array of `shape` whose axes have logical `names`.

  The first rule naming an axis wins. A mesh axis is used at most once per
  array; where the mapped mesh axes do not divide the dimension, the longest
  prefix of them that does is used (none: the dimension is replicated).
  """
  rule_map = {}
  for logical, mesh_axes in rules:
    rule_map.setdefault(logical, mesh_axes)
  used: set[str] = set()
  spec = []
  for name, size in zip(names, shape):
    if name is None:
      spec.append(None)
      continue
    if name not in rule_map:
      raise ValueError(f"logical axis {name!r} has no rule; rules cover {sorted(rule_map)}")
    mesh_axes = rule_map[name]
    mesh_axes = () if mesh_axes is None else (
        (mesh_axes,) if isinstance(mesh_axes, str) else tuple(mesh_axes))
    chosen: tuple[str, ...] = ()
    for axis in mesh_axes:
      candidate = chosen + (axis,)
      ways = 1
      for a in candidate:
        ways *= mesh.shape[a]
      if axis in used or size % ways:
        break
      chosen = candidate
    used.update(chosen)
    spec.append(None if not chosen else chosen[0] if len(chosen) == 1 else chosen)
  return PartitionSpec(*spec)


def param_shardings(abstract_params: Any, mesh: jax.sharding.Mesh,
                    rules: Rules = LOGICAL_AXIS_RULES) -> Any:
  """`NamedSharding` for every leaf of a (boxed) parameter tree.

  Args:
    abstract_params: e.g. `jax.eval_shape(model.init, ...)['params']`: leaves are
      `nn.LogicallyPartitioned` boxes (or plain arrays / ShapeDtypeStructs,
      which are replicated).
    mesh: the device mesh.
    rules: logical name -> mesh axes.

  Returns:
    A tree with the structure of `unbox(abstract_params)`.
  """
  def one(leaf):
    if isinstance(leaf, nn.LogicallyPartitioned):
      return NamedSharding(mesh, logical_to_spec(leaf.names, leaf.value.shape, mesh, rules))
    return NamedSharding(mesh, PartitionSpec())

  return jax.tree.map(one, abstract_params,
                      is_leaf=lambda x: isinstance(x, nn.LogicallyPartitioned))


def batch_sharding(mesh: jax.sharding.Mesh, ndim: int,
                   rules: Rules = LOGICAL_AXIS_RULES) -> NamedSharding:
  """Sharding of an input batch of rank `ndim`: the leading axis on 'batch'."""
  batch_axes = next(mesh_axes for logical, mesh_axes in rules if logical == "batch")
  return NamedSharding(mesh, PartitionSpec(batch_axes, *([None] * (ndim - 1))))
