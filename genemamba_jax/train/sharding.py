"""Device mesh and logical-axis sharding rules (multi-process start-up: train/distributed.py).

The mesh has three axes, outermost first:

  data    pure data parallelism: parameters replicated, batch split.
  fsdp    batch split too, and every large parameter split along its "embed"
          dimension (ZeRO-3 style: gathered for use, gradients reduce-scattered).
  tensor  Megatron-style: the mixers' "inner" (d_inner) / "heads" dimension and
          the vocabulary are split, so each device computes a slice of a layer.

The model names each parameter dimension (layers, embed, inner, ...; see
`genemamba_jax/model/layers.py`); `LOGICAL_RULES` maps names to mesh axes and
`param_shardings` turns a (abstract) state into NamedShardings. XLA's sharding
propagation (GSPMD) does the rest inside `jax.jit`.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import numpy as np
from flax import nnx
from jax.sharding import AxisType, Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

MESH_AXES = ("data", "fsdp", "tensor")
# Batch dimension of every input: split over all devices that hold different data.
BATCH_AXES = ("data", "fsdp")

# (logical name, mesh axis or None), in priority order: a rule applies to a
# dimension of that name if the mesh axis is not used yet by another dimension
# of the same array and divides the dimension's size; otherwise the next rule
# for the name is tried, and a dimension no rule places is replicated.
LOGICAL_RULES: tuple[tuple[str, str | None], ...] = (
    # Scanned layers: every scan step reads one whole layer, so splitting the
    # stack axis would gather all layers each step.
    ("layers", None),
    ("embed", "fsdp"),
    # Combine's [2d, d] kernel: fsdp goes to its "embed" dim first; this one
    # only takes fsdp when d is not divisible by it.
    ("embed_pair", "fsdp"),
    ("inner", "tensor"),
    ("heads", "tensor"),
    ("vocab", "tensor"),
    # Small dimensions: never worth splitting.
    ("state", None),
    ("dt_rank", None),
    ("conv_kernel", None),
)


def mesh_shape(cfg: Any, num_devices: int) -> tuple[int, int, int]:
  """(data, fsdp, tensor) sizes from cfg, -1 resolved; ValueError if they do not fit."""
  sizes = [int(getattr(cfg, axis)) for axis in MESH_AXES]
  described = ", ".join(f"{a}={s}" for a, s in zip(MESH_AXES, sizes))
  if any(s == 0 or s < -1 for s in sizes) or sizes.count(-1) > 1:
    raise ValueError(f"mesh {described}: sizes must be >= 1, with at most one -1 (= the rest)")
  if -1 in sizes:
    known = -math.prod(sizes)
    if num_devices % known:
      raise ValueError(f"mesh {described}: {num_devices} devices are not a multiple of {known}")
    sizes[sizes.index(-1)] = num_devices // known
  if math.prod(sizes) != num_devices:
    raise ValueError(f"mesh {described} needs {math.prod(sizes)} devices, but there are "
                     f"{num_devices} (jax.device_count())")
  return tuple(sizes)


def make_mesh(cfg: Any, devices: Sequence[jax.Device] | None = None) -> Mesh:
  """Mesh ("data", "fsdp", "tensor") over `devices` (default: all, every process).

  Axis types are Auto: shardings are set on jit inputs/outputs and GSPMD
  propagates them; the model needs no sharding annotations in its code.
  """
  devices = jax.devices() if devices is None else list(devices)
  shape = mesh_shape(cfg, len(devices))
  return jax.make_mesh(shape, MESH_AXES, axis_types=(AxisType.Auto,) * len(MESH_AXES),
                       devices=devices)


def logical_to_spec(names: Sequence[str | None], shape: Sequence[int], mesh: Mesh,
                    rules: Sequence[tuple[str, Any]] = LOGICAL_RULES) -> P:
  """PartitionSpec of an array with dimension `names` and `shape` (see LOGICAL_RULES)."""
  if len(names) != len(shape):
    raise ValueError(f"axis names {tuple(names)} do not match shape {tuple(shape)}")
  spec: list[Any] = [None] * len(names)
  decided = [False] * len(names)
  used: set[str] = set()
  for logical, target in rules:
    for i, name in enumerate(names):
      if name != logical or decided[i]:
        continue
      if target is None:  # explicitly replicated
        decided[i] = True
        continue
      axes = (target,) if isinstance(target, str) else tuple(target)
      unknown = [a for a in axes if a not in mesh.shape]
      if unknown:
        raise ValueError(f"rule ({logical!r}, {target!r}) names mesh axes {unknown} "
                         f"not in the mesh {tuple(mesh.shape)}")
      # A dim not divisible by the axis size stays replicated rather than
      # failing: e.g. 25,426 vocab rows over tensor=4.
      if used.intersection(axes) or shape[i] % math.prod(mesh.shape[a] for a in axes):
        continue
      spec[i], decided[i] = target, True
      used.update(axes)
  return P(*spec)


def _sharding_of(x: Any, mesh: Mesh, rules) -> Any:
  if isinstance(x, nnx.Variable):
    names = x.get_metadata().get("out_sharding")
    value = x.get_value()
    if names and hasattr(value, "shape"):
      return x.replace(NamedSharding(mesh, logical_to_spec(names, value.shape, mesh, rules)))
    return x.replace(NamedSharding(mesh, P()))
  return NamedSharding(mesh, P())


def param_shardings(abstract_params: Any, mesh: Mesh,
                    rules: Sequence[tuple[str, Any]] = LOGICAL_RULES) -> Any:
  """Pytree like `abstract_params` of NamedSharding (inside the same nnx.Variables).

  A Variable with `out_sharding` names is placed by `logical_to_spec`; any
  other leaf is replicated. Works for any pytree holding such Variables, e.g.
  the whole train state: optax's moments are `jax.tree.map`s of the params
  nnx.State, so they keep the Params' names and get the params' shardings.
  Arrays or ShapeDtypeStructs both work; only shapes are read.
  """
  return jax.tree.map(lambda x: _sharding_of(x, mesh, rules), abstract_params,
                      is_leaf=lambda x: isinstance(x, nnx.Variable))


def state_shardings(abstract_state: Any, mesh: Mesh,
                    rules: Sequence[tuple[str, Any]] = LOGICAL_RULES) -> Any:
  """Shardings of a whole train state {"params", "opt_state", "step", "rng"}.

  `param_shardings` of all of it: Adam's moments and MultiSteps' accumulator
  mirror the params nnx.State (so share their shardings); counters, the step
  and the RNG key are replicated.
  """
  return param_shardings(abstract_state, mesh, rules)


def with_shardings(abstract: Any, shardings: Any) -> Any:
  """ShapeDtypeStructs of `abstract` carrying `shardings` (a restore target)."""
  import optax  # pylint: disable=g-import-not-at-top
  # optax.multi_transform's state holds MaskedNode (no array) where a group does not apply;
  # the shardings tree has a sharding there.
  masked = lambda x: isinstance(x, optax.MaskedNode)
  return jax.tree.map(lambda a, s: a if masked(a) else
                      jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                      abstract, shardings, is_leaf=masked)


def batch_sharding(mesh: Mesh) -> NamedSharding:
  """Batch dim (axis 0) over ("data", "fsdp"); the rest replicated (also for [B] arrays)."""
  return NamedSharding(mesh, P(BATCH_AXES))


def shard_batch(batch: Mapping[str, np.ndarray], mesh: Mesh) -> dict[str, jax.Array]:
  """This process's batch (its rows of the global batch) -> global jax.Arrays."""
  sharding = batch_sharding(mesh)
  return {k: jax.make_array_from_process_local_data(sharding, np.asarray(v))
          for k, v in batch.items()}
