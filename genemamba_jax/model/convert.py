"""Mixer weights to and from mamba_ssm-named PyTorch state dicts.

PyTorch layouts: Linear weight [out, in] (Flax kernel [in, out]); depthwise
Conv1d weight [C, 1, K] (Flax kernel [K, 1, C]); `kernel` is named `weight`;
every other parameter (A_log, D, dt_bias, norm.weight, biases) is the same
array under the same name. Keys carry no prefix: pass a mixer's own slice of a
model state dict (e.g. the keys under `...layers.{i}.mamba.` with it removed).
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping

import jax.numpy as jnp
import numpy as np
from flax import nnx

from genemamba_jax.model.layers import CausalConv1d


def _torch_params(mixer: nnx.Module) -> Iterator[tuple[str, nnx.Param, object, object]]:
  """(torch key, Param, to_torch, from_torch) for every parameter of `mixer`.

  to_torch / from_torch map a numpy array between the Flax and PyTorch layouts.
  """
  ident = lambda a: a
  for path, node in nnx.iter_graph(mixer):
    if not isinstance(node, nnx.Param):
      continue
    parent = mixer
    for part in path[:-1]:
      parent = getattr(parent, part) if isinstance(part, str) else parent[part]
    name = path[-1]
    to_t = from_t = ident
    if name == "kernel" and isinstance(parent, nnx.Linear):
      name, to_t, from_t = "weight", np.transpose, np.transpose
    elif name == "kernel" and isinstance(parent, (nnx.Conv, CausalConv1d)):
      # [K, 1, C] <-> [C, 1, K]: reversing the axes is its own inverse.
      to_t = from_t = lambda a: np.transpose(a, (2, 1, 0))
      name = "weight"
    key = ".".join([str(p) for p in path[:-1]] + [name])
    yield key, node, to_t, from_t


def mixer_state_dict(mixer: nnx.Module) -> dict[str, np.ndarray]:
  """The mixer's parameters as a mamba_ssm-named state dict, PyTorch layouts, float32."""
  return {key: np.ascontiguousarray(to_t(np.asarray(param[...], np.float32)))
          for key, param, to_t, _ in _torch_params(mixer)}


def load_mixer_state_dict(mixer: nnx.Module, state_dict: Mapping[str, np.ndarray]) -> None:
  """Copy a mamba_ssm-named PyTorch mixer state dict into `mixer`, in place.

  Strict: every key must be present with the PyTorch shape of the matching
  parameter, and no key may be left over; otherwise ValueError naming the key
  (and both shapes). Values may be numpy arrays or anything np.asarray takes
  (torch tensors on CPU: call `.detach().numpy()` first for gradient tensors);
  they are stored as float32.
  """
  params = list(_torch_params(mixer))
  expected = {key for key, *_ in params}
  missing = sorted(expected - set(state_dict))
  unexpected = sorted(set(state_dict) - expected)
  if missing or unexpected:
    raise ValueError(f"mixer state dict: missing keys {missing}, unexpected keys {unexpected}")
  # Check every shape before writing anything, so a failed load leaves the mixer as it was.
  arrays = {}
  for key, param, to_t, from_t in params:
    value = np.asarray(state_dict[key])
    want = tuple(to_t(np.empty(param[...].shape, np.bool_)).shape)
    if value.shape != want:
      raise ValueError(f"mixer state dict: {key!r} has shape {tuple(value.shape)}, "
                       f"the mixer expects {want}")
    arrays[key] = from_t(value.astype(np.float32))
  for key, param, *_ in params:
    param[...] = jnp.asarray(arrays[key], param[...].dtype)
