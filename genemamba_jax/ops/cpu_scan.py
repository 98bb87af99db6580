"""Mamba-1 selective scan as compiled CPU kernels (numba), forward and backward.

Same recurrence and contract as the backends in `selective_scan.py`:

  h_t = exp(dt_t * A) * h_{t-1} + (dt_t * x_t)[:, None] * B_t[None, :]
  y_t = h_t @ C_t

Why a kernel on CPU: XLA:CPU runs the recurrence as a while loop of separate
fusions over [batch, d, N] per time step. The forward is fine, but its autodiff
backward stores and reloads per-step residuals and reduces over d and N in
small fusions, most of a Mamba-1 train step (bench/NOTES.md). Here LANES
neighbouring channels of a
batch element are one vector: their [N, LANES] state stays in L1, a step's
exps and updates are LANES-wide vector ops per state row (with no horizontal
sums in the forward), and the (batch, channel block) items are spread over the
cores. Vectorising over channels rather than over N measured faster (bench/NOTES.md):
channels are contiguous in [b, L, d] and need no reductions; N is short.

Forward (`_forward`): parallel over (batch, block of LANES channels). Writes y
and, when the gradient is wanted, the state entering every chunk of
`chunk_size` steps, [b, L / chunk, N, d], the only residual besides the inputs.

Backward (`_backward`): parallel over (batch, block of 64 channels). Per LANES
channels, chunks in reverse: the chunk's states and decays are recomputed from
the saved boundary state into [chunk, N, LANES] scratch, then walked
backwards carrying g = dL/dh [N, LANES] and the dA rows. dB and dC are
reductions over channels, so each (batch, channel block) writes its own [L, N]
partial; dA is written per batch element; the partials are summed outside the
kernel. No [b, L, d, N] tensor exists in either pass.

exp is a Cephes-style float32 exp (Cody-Waite reduction, degree-6 polynomial,
exponent by bit construction, <= 5 ulp), written out so that LLVM vectorises
it: numba's `math.exp` is a scalar libm call per element, which alone would
cost more than the whole XLA forward.

The kernels run on the host through `jax.pure_callback` (CPU backend only),
on the arrays' own [b, L, d] layout (no transposes around the call).

Threads: unless NUMBA_THREADING_LAYER says otherwise, numba's `workqueue` pool
is used. With the OpenMP pool (numba's first choice where libgomp loads), idle
workers spin after each call and take the cores from XLA's ops in between (a
slower Mamba-1 train step, bench/NOTES.md); the workqueue pool is also fork-safe (Grain's worker processes fork). It may not be
entered from two threads at once, and XLA may run independent callbacks
concurrently, so calls are serialised by a lock.
"""

from __future__ import annotations

import functools
import math
import os
import threading

import jax
import jax.numpy as jnp
import numba
import numpy as np

from genemamba_jax.ops import scan_utils

_F32 = np.float32
# Channels updated together as one vector op (two AVX2 / one AVX-512 register of float32).
LANES = 16

if "NUMBA_THREADING_LAYER" not in os.environ:  # see the module docstring
  numba.config.THREADING_LAYER = "workqueue"


def _njit(**kwargs):
  """numba.njit with the on-disk cache where a cache directory is writable."""
  def wrap(fn):
    try:
      return numba.njit(cache=True, nogil=True, fastmath=True, **kwargs)(fn)
    except RuntimeError:  # no writable cache directory anywhere: compile per process
      return numba.njit(nogil=True, fastmath=True, **kwargs)(fn)
  return wrap


@_njit(inline="always")
def _exp(x):
  """float32 exp, vectorisable: <= 5 ulp on [-87, 88]; inputs are clamped to that range
  (exp(-87) ~ 1.6e-38, the smallest normal float32 is 1.2e-38)."""
  x = min(max(x, _F32(-87.0)), _F32(88.0))
  k = np.int32(math.floor(_F32(1.4426950408889634) * x + _F32(0.5)))  # round(x / ln 2)
  kf = _F32(k)
  r = x - kf * _F32(0.693359375) - kf * _F32(-2.12194440e-4)  # x - k ln 2, in two parts
  p = _F32(1.9875691500e-4)
  p = p * r + _F32(1.3981999507e-3)
  p = p * r + _F32(8.3334519073e-3)
  p = p * r + _F32(4.1665795894e-2)
  p = p * r + _F32(1.6666665459e-1)
  p = p * r + _F32(5.0000001201e-1)
  p = p * r * r + r + _F32(1.0)
  return p * np.int32((k + 127) << 23).view(np.float32)  # * 2^k


@_njit(parallel=True)
def _forward(x, dt, A_t, B, C, chunk, save_states, y, h_chunks):
  """y and chunk-boundary states of the recurrence.

  Work items are (batch element, block of LANES channels); a step updates the block's
  [N, LANES] state one state row at a time, each row a LANES-wide vector op.

  Args:
    x, dt: [b, L, d] float32.
    A_t: [N, d] (A transposed); B, C: [b, L, N].
    chunk: steps per chunk of the saved states.
    save_states: whether to fill h_chunks.
    y: [b, L, d] output.
    h_chunks: [b, ceil(L / chunk), N, d] output: the state before each chunk.
  """
  nb, length, nd = x.shape
  n = A_t.shape[0]
  n_blocks = -(-nd // LANES)
  for item in numba.prange(nb * n_blocks):
    bi = item // n_blocks
    d0 = (item - bi * n_blocks) * LANES
    w = min(LANES, nd - d0)
    h = np.zeros((n, LANES), np.float32)
    dt_t = np.zeros(LANES, np.float32)
    u = np.zeros(LANES, np.float32)
    acc = np.zeros(LANES, np.float32)
    a_blk = np.zeros((n, LANES), np.float32)
    for j in range(n):
      for k in range(w):
        a_blk[j, k] = A_t[j, d0 + k]
    for t in range(length):
      if save_states and t % chunk == 0:
        for j in range(n):
          for k in range(w):
            h_chunks[bi, t // chunk, j, d0 + k] = h[j, k]
      for k in range(w):
        dt_t[k] = dt[bi, t, d0 + k]
        u[k] = dt_t[k] * x[bi, t, d0 + k]
        acc[k] = 0
      for j in range(n):
        b_j = B[bi, t, j]
        c_j = C[bi, t, j]
        h_j = h[j]
        a_j = a_blk[j]
        for k in range(LANES):
          hk = _exp(dt_t[k] * a_j[k]) * h_j[k] + u[k] * b_j
          h_j[k] = hk
          acc[k] += hk * c_j
      for k in range(w):
        y[bi, t, d0 + k] = acc[k]


@_njit(parallel=True)
def _backward(x, dt, A_t, B, C, gy, h_chunks, chunk, block_d, gx, gdt, gA, gB, gC):
  """Gradients of sum(gy * y) through the recurrence.

  Work items are (batch element, block of `block_d` channels), walked LANES channels at a
  time: per chunk, in reverse, the chunk's decays and states are recomputed from the saved
  boundary state into [chunk, N, LANES] scratch, then the chunk is walked backwards
  carrying g = dL/dh [N, LANES] and the dA rows.

  Args:
    x, dt, gy: [b, L, d]; A_t: [N, d]; B, C: [b, L, N]; h_chunks: from `_forward`.
    block_d: channels per work item (a multiple of LANES); each item writes one [L, N]
      partial of dB and dC.
    gx, gdt: [b, L, d] outputs.
    gA: [b, N, d] output, per batch element (summed over b by the caller).
    gB, gC: [b, ceil(d / block_d), L, N] outputs, per channel block (summed by the caller).
  """
  nb, length, nd = x.shape
  n = A_t.shape[0]
  n_blocks = gB.shape[1]
  for item in numba.prange(nb * n_blocks):
    bi = item // n_blocks
    blk = item - bi * n_blocks
    gB_part = gB[bi, blk]
    gC_part = gC[bi, blk]
    gB_part[:] = 0
    gC_part[:] = 0
    # Lanes past d (a last partial block) compute on zeros and are never written out.
    states = np.zeros((chunk + 1, n, LANES), np.float32)  # h entering step s: states[s]
    decays = np.zeros((chunk, n, LANES), np.float32)
    g = np.zeros((n, LANES), np.float32)  # dL/dh carried back from the later steps
    gA_blk = np.zeros((n, LANES), np.float32)
    a_blk = np.zeros((n, LANES), np.float32)
    dt_t = np.zeros(LANES, np.float32)
    u = np.zeros(LANES, np.float32)
    gy_t = np.zeros(LANES, np.float32)
    g_u = np.zeros(LANES, np.float32)
    g_dta = np.zeros(LANES, np.float32)
    for d0 in range(blk * block_d, min((blk + 1) * block_d, nd), LANES):
      w = min(LANES, nd - d0)
      g[:] = 0
      gA_blk[:] = 0
      a_blk[:] = 0
      states[:] = 0
      for j in range(n):
        for k in range(w):
          a_blk[j, k] = A_t[j, d0 + k]
      dt_t[:] = 0
      u[:] = 0
      gy_t[:] = 0
      for c in range(h_chunks.shape[1] - 1, -1, -1):
        t0 = c * chunk
        steps = min(chunk, length - t0)
        for j in range(n):
          for k in range(w):
            states[0, j, k] = h_chunks[bi, c, j, d0 + k]
        for s in range(steps):  # recompute the chunk's decays and states
          t = t0 + s
          for k in range(w):
            dt_t[k] = dt[bi, t, d0 + k]
            u[k] = dt_t[k] * x[bi, t, d0 + k]
          for j in range(n):
            b_j = B[bi, t, j]
            a_j = a_blk[j]
            h_prev = states[s, j]
            h_next = states[s + 1, j]
            dec = decays[s, j]
            for k in range(LANES):
              a = _exp(dt_t[k] * a_j[k])
              dec[k] = a
              h_next[k] = a * h_prev[k] + u[k] * b_j
        for s in range(steps - 1, -1, -1):
          t = t0 + s
          for k in range(w):
            dt_t[k] = dt[bi, t, d0 + k]
            u[k] = dt_t[k] * x[bi, t, d0 + k]
            gy_t[k] = gy[bi, t, d0 + k]
          g_u[:] = 0
          g_dta[:] = 0
          for j in range(n):
            b_j = B[bi, t, j]
            c_j = C[bi, t, j]
            g_j = g[j]
            gA_j = gA_blk[j]
            a_j = a_blk[j]
            h_prev = states[s, j]
            h_t = states[s + 1, j]
            dec = decays[s, j]
            acc_b = _F32(0.0)
            acc_c = _F32(0.0)
            # dB and dC sum over channels: one horizontal sum per state row and step.
            for k in range(LANES):
              gh = g_j[k] + gy_t[k] * c_j  # dL/dh_t
              acc_c += gy_t[k] * h_t[k]
              acc_b += gh * u[k]
              g_u[k] += gh * b_j
              q = gh * h_prev[k] * dec[k]  # dL/d(dt A) of this lane and row
              g_dta[k] += q * a_j[k]
              gA_j[k] += q * dt_t[k]
              g_j[k] = gh * dec[k]  # carried to h_{t-1}
            gB_part[t, j] += acc_b
            gC_part[t, j] += acc_c
          for k in range(w):
            gx[bi, t, d0 + k] = g_u[k] * dt_t[k]
            gdt[bi, t, d0 + k] = g_u[k] * x[bi, t, d0 + k] + g_dta[k]
      for j in range(n):
        for k in range(w):
          gA[bi, j, d0 + k] = gA_blk[j, k]


# numba's workqueue thread pool must not be entered from two threads at once.
_LOCK = threading.Lock()
# Channels per backward work item (a multiple of LANES), each with its own [L, N] partials
# of dB and dC.
_BACKWARD_BLOCK_D = 4 * LANES


def _n_chunks(length: int, chunk: int) -> int:
  return -(-length // chunk)


def host_bytes(b: int, length: int, d: int, n: int, chunk: int, *, grad: bool) -> int:
  """Peak bytes of the host arrays one call allocates outside XLA's buffer plan.

  Forward: y [b, L, d] (+ the saved states [b, d, L / chunk, N] when `grad`). Backward
  (`grad`): also dx, ddt [b, L, d], dA [b, N, d] and the dB, dC partials
  [b, d / 64, L, N]; per-thread scratch ((2 chunk + 4) N LANES floats) is negligible.
  """
  y = b * length * d
  states = b * d * _n_chunks(length, chunk) * n
  if not grad:
    return 4 * y
  partials = 2 * b * (-(-d // _BACKWARD_BLOCK_D)) * length * n
  return 4 * max(y + states, states + 2 * y + b * d * n + partials)


def _run_forward(x, dt, A, B, C, *, chunk, save_states):
  x, dt, A, B, C = (np.asarray(a, np.float32) for a in (x, dt, A, B, C))
  b, length, d = x.shape
  y = np.empty((b, length, d), np.float32)
  n_saved = _n_chunks(length, chunk) if save_states else 0
  h_chunks = np.empty((b, n_saved, A.shape[1], d), np.float32)
  with _LOCK:
    _forward(x, dt, np.ascontiguousarray(A.T), B, C, chunk, save_states, y, h_chunks)
  return (y, h_chunks) if save_states else y


def _run_backward(x, dt, A, B, C, gy, h_chunks, *, chunk):
  x, dt, A, B, C, gy, h_chunks = (np.asarray(a, np.float32)
                                  for a in (x, dt, A, B, C, gy, h_chunks))
  b, length, d = x.shape
  n = A.shape[1]
  n_blocks = -(-d // _BACKWARD_BLOCK_D)
  gx = np.empty_like(x)
  gdt = np.empty_like(dt)
  gA = np.empty((b, n, d), np.float32)
  gB = np.empty((b, n_blocks, length, n), np.float32)
  gC = np.empty((b, n_blocks, length, n), np.float32)
  with _LOCK:
    _backward(x, dt, np.ascontiguousarray(A.T), B, C, gy, h_chunks, chunk, _BACKWARD_BLOCK_D,
              gx, gdt, gA, gB, gC)
  return gx, gdt, gA.sum(0).T, gB.sum(1), gC.sum(1)


def _callback(fn, shapes, *args):
  # The kernels loop over the batch themselves: a vmap over them is one call per element.
  return jax.pure_callback(fn, shapes, *args, vmap_method="sequential")


@functools.partial(jax.custom_vjp, nondiff_argnums=(5,))
def _scan(x, dt, A, B, C, chunk):
  """x, dt: [b, L, d]; A: [d, N]; B, C: [b, L, N]; all float32 -> y [b, L, d]."""
  return _callback(functools.partial(_run_forward, chunk=chunk, save_states=False),
                   jax.ShapeDtypeStruct(x.shape, jnp.float32), x, dt, A, B, C)


def _scan_fwd(x, dt, A, B, C, chunk):
  b, length, d = x.shape
  shapes = (jax.ShapeDtypeStruct(x.shape, jnp.float32),
            jax.ShapeDtypeStruct((b, _n_chunks(length, chunk), A.shape[1], d), jnp.float32))
  y, h_chunks = _callback(functools.partial(_run_forward, chunk=chunk, save_states=True),
                          shapes, x, dt, A, B, C)
  return y, (x, dt, A, B, C, h_chunks)


def _scan_bwd(chunk, residuals, gy):
  x, dt, A, B, C, _ = residuals
  f32 = lambda a: jax.ShapeDtypeStruct(a.shape, jnp.float32)
  shapes = tuple(f32(a) for a in (x, dt, A, B, C))
  x, dt, A, B, C, h_chunks = residuals
  return _callback(functools.partial(_run_backward, chunk=chunk), shapes,
                   x, dt, A, B, C, gy, h_chunks)


_scan.defvjp(_scan_fwd, _scan_bwd)


def selective_scan_cpu(x, dt, A, B, C, chunk_size: int = 64):
  """The kernels' selective scan; same contract as `selective_scan._chunked`.

  Args:
    x, dt: [b, L, d] float32 (dt > 0); A: [d, N] float32 (< 0); B, C: [b, L, N] float32.
    chunk_size: steps between the states the forward saves for the backward
      (memory b * d * N * L / chunk_size); L need not be a multiple of it.

  Returns:
    y: [b, L, d] float32 (no D term).
  """
  scan_utils.check_chunk_size(chunk_size)
  if jax.default_backend() != "cpu":
    raise ValueError(f"the CPU scan kernel runs on the CPU backend only, not "
                     f"{jax.default_backend()!r}; use scan_backend='auto' or 'chunked'")
  return _scan(x, dt, A, B, C, chunk_size)
