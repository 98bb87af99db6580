"""Helpers shared by the Mamba-1 and Mamba-2 scans: dispatch, padding, combine."""

from __future__ import annotations

import functools
import logging
from typing import Callable, Mapping

import jax
import jax.numpy as jnp

BACKENDS = ("sequential", "associative", "chunked")  # the XLA backends, on every platform
# What a model config may name: the XLA backends, the Pallas kernel (GPU), the numba kernels
# (CPU), and `auto`, resolved per platform and op. (Tests run the Pallas kernel on CPU in Pallas's
# interpreter with `pallas_scan.interpreted()`, not by a backend name.)
SELECTABLE = (*BACKENDS, "pallas", "numba", "auto")


def get_backend(registry: Mapping[str, Callable], backend: str) -> Callable:
  """Looks `backend` up in `registry`; unknown names raise a ValueError.

  Each op keeps its own name -> implementation dict, so a new backend (e.g.
  "pallas", or an "auto" that picks one by shape/platform) is one more entry.
  """
  try:
    return registry[backend]
  except (KeyError, TypeError):
    raise ValueError(
        f"unknown scan backend {backend!r}; valid backends: "
        f"{', '.join(sorted(registry))}") from None


@functools.cache
def log_fallback(wanted: str, used: str, reason: str) -> None:
  """Logs once per (wanted, used, reason) that a backend was replaced, and why."""
  logging.getLogger("genemamba_jax.ops").warning("scan backend %s unavailable (%s); using %s",
                                                 wanted, reason, used)


def linear_combine(left, right):
  """Combine of the first-order linear recurrence h_t = a_t * h_{t-1} + b_t.

  Elements are (a, b) pairs meaning "h -> a * h + b"; applying `left` then
  `right` gives h -> (a_r * a_l) * h + (a_r * b_l + b_r). Associative, so
  `jax.lax.associative_scan` yields (prod a, h_t) with h_{-1} = 0. `a` may be
  broadcastable against `b` (Mamba-2 keeps one decay per head).
  """
  a_l, b_l = left
  a_r, b_r = right
  return a_r * a_l, a_r * b_l + b_r


def pad_time(arrays, chunk_size: int):
  """Pads axis 1 (time) of each array with zeros up to a multiple of chunk_size.

  Zero padding is what makes the tail a no-op for the state: dt = 0 gives a
  decay exp(0 * A) = 1 and an input dt * x * B = 0, so h is unchanged and the
  padded outputs are simply sliced off by the caller.

  Returns:
    (padded arrays, number of chunks).
  """
  length = arrays[0].shape[1]
  n_chunks = -(-length // chunk_size)
  pad = n_chunks * chunk_size - length
  if pad:
    arrays = [
        jnp.pad(a, [(0, 0), (0, pad)] + [(0, 0)] * (a.ndim - 2))
        for a in arrays
    ]
  return list(arrays), n_chunks


def to_chunks(a: jax.Array, chunk_size: int) -> jax.Array:
  """[batch, n_chunks * chunk_size, ...] -> [n_chunks, batch, chunk_size, ...].

  Chunk axis leading so `lax.scan` walks over it.
  """
  b, length = a.shape[:2]
  a = a.reshape((b, length // chunk_size, chunk_size) + a.shape[2:])
  return jnp.moveaxis(a, 1, 0)


def from_chunks(a: jax.Array) -> jax.Array:
  """[n_chunks, batch, chunk_size, ...] -> [batch, n_chunks * chunk_size, ...]."""
  a = jnp.moveaxis(a, 0, 1)
  return a.reshape((a.shape[0], a.shape[1] * a.shape[2]) + a.shape[3:])


def check_chunk_size(chunk_size: int) -> None:
  if not isinstance(chunk_size, int) or chunk_size < 1:
    raise ValueError(f"chunk_size must be a positive int, got {chunk_size!r}")
