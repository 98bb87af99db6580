"""Model weights to and from PyTorch state dicts: mamba_ssm mixers and the original GeneMamba.

Layouts: a Flax `kernel` is a PyTorch `weight`; 2-D kernels are transposed
([in, out] <-> [out, in]) and 3-D ones (the depthwise conv, [K, 1, C] <->
[C, 1, K]) have their axes reversed, both their own inverse. `scale` (RMSNorm)
and `embedding` are `weight`s in PyTorch. Every other array (A_log, D,
dt_bias, norm.weight, biases) keeps its name and layout.

The original GeneMamba's `MambaModel` (keys below) is our GeneMamba with
mixed streams, Mamba-2 layers and one `aggr` shared by all layers:

  embeddings.weight                        embeddings/embedding
  mamba_mixer.layers.{i}.mamba.<mixer>     layers/mixer/<mixer>[i]  (stacked on axis 0)
  mamba_mixer.aggr.{weight,bias}           aggr/aggr/{kernel,bias}  (concat and gate only)
  norm_f.weight                            norm_f/scale
  lm_head.{weight,bias}                    lm_head/{kernel,bias}
"""

from __future__ import annotations

from collections.abc import Mapping

import jax.numpy as jnp
import numpy as np
from flax import nnx

from genemamba_jax.model.config import GeneMambaConfig
from genemamba_jax.model.genemamba import GeneMamba

ORIGINAL_LAYER_PREFIX = "mamba_mixer.layers.{}.mamba."


def flatten(tree: Mapping, prefix: str = "") -> dict[str, object]:
  """A nested pure dict -> {"a/b/c": leaf}."""
  out = {}
  for key, value in tree.items():
    path = f"{prefix}/{key}" if prefix else str(key)
    if isinstance(value, Mapping):
      out.update(flatten(value, path))
    else:
      out[path] = value
  return out


def unflatten(flat: Mapping[str, object]) -> dict:
  """{"a/b/c": leaf} -> a nested pure dict."""
  out: dict = {}
  for path, value in flat.items():
    *parents, name = path.split("/")
    node = out
    for part in parents:
      node = node.setdefault(part, {})
    node[name] = value
  return out


def torch_name(name: str) -> str:
  """The PyTorch name of a Flax parameter leaf."""
  return "weight" if name in ("kernel", "scale", "embedding") else name


def torch_layout(name: str, array: np.ndarray) -> np.ndarray:
  """A Flax leaf in PyTorch's layout (and back: the map is its own inverse)."""
  if name == "kernel" and array.ndim == 2:
    return array.T
  if name == "kernel" and array.ndim == 3:
    return np.transpose(array, (2, 1, 0))
  return array


def _torch_key(path: str) -> str:
  *parents, name = path.split("/")
  return ".".join(parents + [torch_name(name)])


def _mixer_params(mixer: nnx.Module) -> dict[str, nnx.Param]:
  """{flat path: Param} of a mixer, paths as `flatten` writes them."""
  return {"/".join(str(p) for p in path): node for path, node in nnx.iter_graph(mixer)
          if isinstance(node, nnx.Param)}


def mixer_state_dict(mixer: nnx.Module) -> dict[str, np.ndarray]:
  """The mixer's parameters as a mamba_ssm-named state dict, PyTorch layouts, float32.

  Keys carry no prefix (e.g. "in_proj.weight", "A_log").
  """
  return {_torch_key(path): np.ascontiguousarray(
              torch_layout(path.rsplit("/", 1)[-1], np.asarray(param[...], np.float32)))
          for path, param in _mixer_params(mixer).items()}


def load_mixer_state_dict(mixer: nnx.Module, state_dict: Mapping[str, np.ndarray]) -> None:
  """Copy a mamba_ssm-named PyTorch mixer state dict into `mixer`, in place.

  Strict: every key must be present with the PyTorch shape of the matching
  parameter, and no key may be left over; otherwise ValueError naming the key
  (and both shapes). Values may be numpy arrays or anything np.asarray takes
  (torch tensors on CPU: call `.detach().numpy()` first for gradient tensors);
  they are stored as float32. A failed load leaves the mixer as it was.
  """
  params = _mixer_params(mixer)
  keys = {_torch_key(path): path for path in params}
  missing, unexpected = sorted(set(keys) - set(state_dict)), sorted(set(state_dict) - set(keys))
  if missing or unexpected:
    raise ValueError(f"mixer state dict: missing keys {missing}, unexpected keys {unexpected}")
  arrays = {}
  for key, path in keys.items():
    name, shape = path.rsplit("/", 1)[-1], params[path][...].shape
    value = np.asarray(state_dict[key])
    want = torch_layout(name, np.empty(shape, np.bool_)).shape
    if value.shape != want:
      raise ValueError(f"mixer state dict: {key!r} has shape {tuple(value.shape)}, "
                       f"the mixer expects {tuple(want)}")
    arrays[path] = torch_layout(name, value.astype(np.float32))
  for path, param in params.items():
    param[...] = jnp.asarray(arrays[path], param[...].dtype)


# --- the original GeneMamba's MambaModel ------------------------------------------------------


def _original_keys(path: str, n_layers: int) -> list[str]:
  """The original state-dict key(s) of one of our flat parameter paths (one per layer for
  stacked layer parameters); ValueError when the original has no such parameter."""
  parts = path.split("/")
  if parts[0] == "layers":
    if parts[1] != "mixer":  # per-layer combine weights, prenorm norms
      raise ValueError(f"parameter {path}")
    sub = _torch_key("/".join(parts[2:]))
    return [ORIGINAL_LAYER_PREFIX.format(i) + sub for i in range(n_layers)]
  if parts[0] == "aggr":  # the model-level Combine holds the Linear `aggr`
    return ["mamba_mixer.aggr." + torch_name(parts[-1])]
  return [_torch_key(path)]


def original_state_dict(params: Mapping, config: GeneMambaConfig) -> dict[str, np.ndarray]:
  """Our GeneMamba parameters (a pure dict) -> the original `MambaModel` state dict.

  float32 numpy arrays in PyTorch layouts, contiguous. The caller checks that
  the original can express `config` (e.g. `genemamba_jax.convert`).
  """
  out = {}
  for path, value in flatten(params).items():
    name = path.rsplit("/", 1)[-1]
    value = np.asarray(value, np.float32)
    keys = _original_keys(path, config.n_layers)
    layers = [value[i] for i in range(len(keys))] if path.startswith("layers/") else [value]
    for key, array in zip(keys, layers):
      out[key] = np.ascontiguousarray(torch_layout(name, array))
  return out


def params_from_original(state_dict: Mapping[str, np.ndarray], config: GeneMambaConfig) -> dict:
  """The original `MambaModel` state dict -> our GeneMamba parameters (pure dict, float32).

  Strict: ValueError names the first missing or unexpected tensor, or a tensor
  whose shape does not fit `config`.
  """
  abstract = nnx.eval_shape(lambda: GeneMamba(config, rngs=nnx.Rngs(0)))
  expected = flatten(nnx.to_pure_dict(nnx.state(abstract, nnx.Param)))
  wanted = {path: _original_keys(path, config.n_layers) for path in expected}
  known = {key for keys in wanted.values() for key in keys}
  unexpected = sorted(set(state_dict) - known)
  if unexpected:
    raise ValueError(f"unexpected tensor {unexpected[0]!r}"
                     + (f" (and {len(unexpected) - 1} more)" if len(unexpected) > 1 else ""))
  flat = {}
  for path, keys in wanted.items():
    name, leaf = path.rsplit("/", 1)[-1], expected[path]
    layer_shape = leaf.shape[1:] if path.startswith("layers/") else leaf.shape
    want = torch_layout(name, np.empty(layer_shape, np.bool_)).shape
    arrays = []
    for key in keys:
      if key not in state_dict:
        raise ValueError(f"missing tensor {key!r}")
      value = np.asarray(state_dict[key])
      if value.shape != want:
        raise ValueError(f"tensor {key!r} has shape {tuple(value.shape)}, the model needs "
                         f"{tuple(want)}")
      arrays.append(torch_layout(name, value.astype(np.float32)))
    flat[path] = np.stack(arrays) if path.startswith("layers/") else arrays[0]
  return unflatten(flat)
