"""Mamba-2 scan (SSD) as compiled CPU kernels (numba), forward and backward.

Same recurrence and contract as the backends in `ssd.py`, per head h of group g:

  h_t = exp(dt_t A) h_{t-1} + dt_t x_t (outer) B_t     (state [P, N])
  y_t = h_t @ C_t

Why a kernel on CPU: the chunked SSD is matmuls, but small ones ([64 x 64] per
chunk and head), with a transpose or a broadcast around each; XLA:CPU runs them
at a fraction of its large-matmul speed and the SSD took ~50 ms of a layer's
forward+backward at the benchmark's size (bench/RESULTS.md). The recurrence
itself is cheap here because the decay is one scalar per step and head, not one
exp per state element as in Mamba-1: a state update is two multiply-adds and
the read-out one more.

Layout and vectorisation follow `cpu_scan.py`: x is read as [b, L, H * P], so
LANES neighbouring channels of one head are one vector, the head's [N, LANES]
state rows stay in L1, and B_t[n], C_t[n] are broadcast scalars: no horizontal
sums in the forward.

Forward (`_forward`): parallel over (batch, head, block of LANES channels).
Writes y and, when the gradient is wanted, the state entering every chunk of
`chunk_size` steps, [b, L / chunk, N, H * P], the only residual besides the
inputs.

Backward (`_backward`): parallel over (batch, head); the head's channels are
walked LANES at a time. Per chunk, in reverse, the chunk's states are recomputed
from the saved boundary state into [chunk + 1, N, LANES] scratch, then walked
backwards carrying g = dL/dh. dt and A are per head, so their gradients
accumulate inside the item; dB and dC sum over the heads of a group, so each
(batch, head) writes its own [L, N] partial, summed outside. No [b, L, H, P, N]
tensor exists in either pass.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
import numba
import numpy as np

from genemamba_jax.ops import scan_utils
from genemamba_jax.ops.cpu_scan import _LOCK, _callback, _n_chunks, _njit

_F32 = np.float32


@_njit(parallel=True)
def _forward(x, dt, A, B, C, chunk, save_states, y, h_chunks):
  """y and chunk-boundary states of the SSD recurrence.

  Work items are (batch element, head); a step updates the head's [P, N] state one row
  (channel) at a time, each row a vector op over N with a dot product with C_t for y.

  Args:
    x: [b, L, H, P] float32; dt: [b, L, H]; A: [H]; B, C: [b, L, G, N].
    chunk: steps per chunk of the saved states.
    save_states: whether to fill h_chunks.
    y: [b, L, H, P] output.
    h_chunks: [b, ceil(L / chunk), H, P, N] output: the state before each chunk.
  """
  nb, length, nh, p = x.shape
  n = B.shape[3]
  heads_per_group = nh // B.shape[2]
  for item in numba.prange(nb * nh):
    bi = item // nh
    hi = item - bi * nh
    gi = hi // heads_per_group
    a_h = A[hi]
    h = np.zeros((p, n), np.float32)
    for t in range(length):
      if save_states and t % chunk == 0:
        h_chunks[bi, t // chunk, hi] = h
      dt_t = dt[bi, t, hi]
      decay = _F32(math.exp(dt_t * a_h))
      b_t = B[bi, t, gi]
      c_t = C[bi, t, gi]
      for k in range(p):
        u = dt_t * x[bi, t, hi, k]
        h_k = h[k]
        acc = _F32(0.0)
        for j in range(n):
          v = decay * h_k[j] + u * b_t[j]
          h_k[j] = v
          acc += v * c_t[j]
        y[bi, t, hi, k] = acc


@_njit(parallel=True)
def _backward(x, dt, A, B, C, gy, h_chunks, chunk, gx, gdt, gA, gB, gC):
  """Gradients of sum(gy * y) through the SSD recurrence.

  Work items are (batch element, head). Per chunk, in reverse, the chunk's states are
  recomputed from the saved boundary state into [chunk + 1, P, N] scratch, then walked
  backwards carrying g = dL/dh [P, N].

  Args:
    x, gy: [b, L, H, P]; dt: [b, L, H]; A: [H]; B, C: [b, L, G, N];
    h_chunks: from `_forward`.
    gx: [b, L, H, P] output; gdt: [b, L, H] output.
    gA: [b, H] output, per batch element (summed over b by the caller).
    gB, gC: [b, H, L, N] outputs, per head (summed over each group's heads by the caller).
  """
  nb, length, nh, p = x.shape
  n = B.shape[3]
  heads_per_group = nh // B.shape[2]
  for item in numba.prange(nb * nh):
    bi = item // nh
    hi = item - bi * nh
    gi = hi // heads_per_group
    a_h = A[hi]
    gB_part = gB[bi, hi]
    gC_part = gC[bi, hi]
    states = np.zeros((chunk + 1, p, n), np.float32)  # h entering step s: states[s]
    decays = np.zeros(chunk, np.float32)
    # The inner loop reads B_t, C_t from `bc` and sums dB_t, dC_t into `acc`: with the
    # states and g that is four arrays, few enough pairs for LLVM to check for overlap at
    # run time and vectorise (with one array per input and output it gives up).
    bc = np.zeros((2, n), np.float32)
    acc = np.zeros((2, n), np.float32)
    # dL/dh_t of the step after the current one, before its decay: dL/dh carried back is
    # decay_next * g.
    g = np.zeros((p, n), np.float32)
    decay_next = _F32(0.0)
    gA_h = _F32(0.0)
    for c in range(h_chunks.shape[1] - 1, -1, -1):
      t0 = c * chunk
      steps = min(chunk, length - t0)
      states[0] = h_chunks[bi, c, hi]
      for s in range(steps):  # recompute the chunk's decays and states
        t = t0 + s
        dt_t = dt[bi, t, hi]
        decay = _F32(math.exp(dt_t * a_h))
        decays[s] = decay
        b_t = B[bi, t, gi]
        for k in range(p):
          u = dt_t * x[bi, t, hi, k]
          h_prev = states[s, k]
          h_next = states[s + 1, k]
          for j in range(n):
            h_next[j] = decay * h_prev[j] + u * b_t[j]
      for s in range(steps - 1, -1, -1):
        t = t0 + s
        dt_t = dt[bi, t, hi]
        decay = decays[s]
        bc[0] = B[bi, t, gi]
        bc[1] = C[bi, t, gi]
        acc[:] = 0
        g_dt = _F32(0.0)
        g_decay = _F32(0.0)
        for k in range(p):
          x_k = x[bi, t, hi, k]
          u = dt_t * x_k
          gy_k = gy[bi, t, hi, k]
          g_k = g[k]
          h_prev = states[s, k]
          h_t = states[s + 1, k]
          b_t = bc[0]
          c_t = bc[1]
          gb_t = acc[0]
          gc_t = acc[1]
          g_u = _F32(0.0)
          g_dec = _F32(0.0)
          for j in range(n):
            gh = g_k[j] * decay_next + gy_k * c_t[j]  # dL/dh_t
            gc_t[j] += gy_k * h_t[j]
            gb_t[j] += gh * u
            g_u += gh * b_t[j]
            g_dec += gh * h_prev[j]
            g_k[j] = gh  # the step before multiplies by this step's decay
          gx[bi, t, hi, k] = g_u * dt_t
          g_dt += g_u * x_k
          g_decay += g_dec
        gB_part[t] = acc[0]
        gC_part[t] = acc[1]
        # decay = exp(dt A): d decay / d dt = decay A, d decay / d A = decay dt.
        g_dta = g_decay * decay
        gdt[bi, t, hi] = g_dt + g_dta * a_h
        gA_h += g_dta * dt_t
        decay_next = decay
    gA[bi, hi] = gA_h


def host_bytes(b: int, length: int, h: int, p: int, g: int, n: int, chunk: int, *,
               grad: bool) -> int:
  """Peak bytes of the host arrays one call allocates outside XLA's buffer plan.

  Forward: y [b, L, H, P] (+ the saved states [b, L / chunk, H, N, P] when `grad`).
  Backward (`grad`): also dx, the dB and dC partials [b, H, L, N], dt [b, L, H] and the
  group sums of dB, dC [b, L, G, N]; per-thread scratch ((chunk + 1) N LANES floats) is
  negligible.
  """
  y = b * length * h * p
  states = b * _n_chunks(length, chunk) * h * n * p
  if not grad:
    return 4 * y
  partials = 2 * b * h * length * n
  return 4 * max(y + states, states + y + partials + b * length * h + 2 * b * length * g * n)


def _run_forward(x, dt, A, B, C, *, chunk, save_states):
  x, dt, A, B, C = (np.asarray(a, np.float32) for a in (x, dt, A, B, C))
  b, length, h, p = x.shape
  y = np.empty_like(x)
  n_saved = _n_chunks(length, chunk) if save_states else 0
  h_chunks = np.empty((b, n_saved, h, p, B.shape[3]), np.float32)
  with _LOCK:
    _forward(x, dt, A, B, C, chunk, save_states, y, h_chunks)
  return (y, h_chunks) if save_states else y


def _run_backward(x, dt, A, B, C, gy, h_chunks, *, chunk):
  x, dt, A, B, C, gy, h_chunks = (np.asarray(a, np.float32)
                                  for a in (x, dt, A, B, C, gy, h_chunks))
  b, length, h, _ = x.shape
  g, n = B.shape[2:]
  gx = np.empty_like(x)
  gdt = np.empty_like(dt)
  gA = np.empty((b, h), np.float32)
  gB = np.empty((b, h, length, n), np.float32)
  gC = np.empty((b, h, length, n), np.float32)
  with _LOCK:
    _backward(x, dt, A, B, C, gy, h_chunks, chunk, gx, gdt, gA, gB, gC)
  # Heads of a group are contiguous (head i is in group i // (H // G)).
  group_sum = lambda a: a.reshape(b, g, h // g, length, n).sum(2).transpose(0, 2, 1, 3)
  return gx, gdt, gA.sum(0), group_sum(gB), group_sum(gC)


@functools.partial(jax.custom_vjp, nondiff_argnums=(5,))
def _ssd(x, dt, A, B, C, chunk):
  """x: [b, L, H, P]; dt: [b, L, H]; A: [H]; B, C: [b, L, G, N]; float32 -> y [b, L, H, P]."""
  return _callback(functools.partial(_run_forward, chunk=chunk, save_states=False),
                   jax.ShapeDtypeStruct(x.shape, jnp.float32), x, dt, A, B, C)


def _ssd_fwd(x, dt, A, B, C, chunk):
  b, length, h, p = x.shape
  shapes = (jax.ShapeDtypeStruct(x.shape, jnp.float32),
            jax.ShapeDtypeStruct((b, _n_chunks(length, chunk), h, p, B.shape[3]), jnp.float32))
  y, h_chunks = _callback(functools.partial(_run_forward, chunk=chunk, save_states=True),
                          shapes, x, dt, A, B, C)
  return y, (x, dt, A, B, C, h_chunks)


def _ssd_bwd(chunk, residuals, gy):
  x, dt, A, B, C, h_chunks = residuals
  shapes = tuple(jax.ShapeDtypeStruct(a.shape, jnp.float32) for a in (x, dt, A, B, C))
  return _callback(functools.partial(_run_backward, chunk=chunk), shapes,
                   x, dt, A, B, C, gy, h_chunks)


_ssd.defvjp(_ssd_fwd, _ssd_bwd)


def ssd_cpu(x, dt, A, B, C, chunk_size: int = 64):
  """The kernels' Mamba-2 scan; same contract as `ssd._chunked`.

  Args:
    x: [b, L, H, P] float32; dt: [b, L, H] float32 (> 0); A: [H] float32 (< 0);
      B, C: [b, L, G, N] float32 with H % G == 0.
    chunk_size: steps between the states the forward saves for the backward
      (memory b * H * P * N * L / chunk_size); L need not be a multiple of it.

  Returns:
    y: [b, L, H, P] float32 (no D term).
  """
  scan_utils.check_chunk_size(chunk_size)
  if jax.default_backend() != "cpu":
    raise ValueError(f"the CPU SSD kernel runs on the CPU backend only, not "
                     f"{jax.default_backend()!r}; use scan_backend='auto' or 'chunked'")
  return _ssd(x, dt, A, B, C, chunk_size)
