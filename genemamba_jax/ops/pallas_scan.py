"""Mamba-1 selective scan as Pallas kernels (Triton lowering), fwd and bwd.

Same recurrence and contract as the backends in `selective_scan.py`:

  h_t = exp(dt_t * A) * h_{t-1} + (dt_t * x_t)[:, None] * B_t[None, :]
  y_t = h_t @ C_t

Forward kernel, grid (batch, d / block_d): each program walks time with a
`fori_loop`, the state h [block_d, N] a float32 loop carry (registers on a
GPU). It writes y and the state entering every chunk of `chunk_size` steps,
[b, L / chunk, d, N], the only residual besides the inputs.

Backward kernel, same grid: chunks in reverse. Per chunk it recomputes the
chunk's states from the saved boundary state into a per-program workspace of
[chunk, block_d, N] (global memory, reused by every chunk, L2-resident in
practice), then walks the chunk backwards carrying g = dL/dh [block_d, N] and
the dA accumulator. It writes dx, ddt per step, dA per batch element and dB,
dC per channel block; those partials are summed outside the kernel. No
[b, L, d, N] tensor exists in either pass: memory is the inputs, the
boundary states and the b * d * chunk * N workspace.

Lowering: jax lowers `pl.pallas_call` on GPU to Mosaic GPU by default
(`jax_pallas_use_mosaic_gpu`, Hopper only); passing
`jax.experimental.pallas.triton.CompilerParams` selects the Triton lowering,
which covers Ampere and Hopper (and ROCm). Triton wants power-of-2 sizes for
every load/store, so block_d must be a power of 2 and N is zero-padded to one.
On CPU the kernels run only with `interpret=True`.

Padding is harmless: x = dt = 0 on padded time steps and channels gives decay
exp(0) = 1 and no input; A = B = C = 0 on padded state columns keeps those
columns at 0. Outputs and gradients of the padding are sliced off.
"""

from __future__ import annotations

import contextlib
import contextvars
import functools
import importlib

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

from genemamba_jax.ops import scan_utils

_GPU_PLATFORMS = ("gpu", "cuda", "rocm")
# Set by `interpreted()`: the `pallas` backend runs in Pallas's interpreter (tests on CPU).
_INTERPRETED = contextvars.ContextVar("pallas_interpreted", default=False)


@contextlib.contextmanager
def interpreted():
  """Within the block, scan backend "pallas" runs the kernels in Pallas's interpreter on any
  platform: how the tests check the kernel through whole models on CPU. (The setting is read
  when a function is traced: call jitted functions inside the block.)"""
  token = _INTERPRETED.set(True)
  try:
    yield
  finally:
    _INTERPRETED.reset(token)


def interpret_forced() -> bool:
  return _INTERPRETED.get()
# The kernels target Ampere (sm_80) and newer; older GPUs are untested.
_MIN_COMPUTE_CAPABILITY = 8.0


def _next_pow2(n: int) -> int:
  return 1 << max(0, (n - 1).bit_length())


def _compiler_params(interpret: bool):
  if interpret:
    return None
  from jax.experimental.pallas import triton as pltriton  # pylint: disable=g-import-not-at-top
  # Each step depends on the previous one: 2 stages let Triton prefetch the
  # next step's loads, the only pipelining the recurrence allows. 4 warps
  # (128 threads) hold a 32 x 16 state at 4 elements per thread.
  return pltriton.CompilerParams(num_warps=4, num_stages=2)


def _barrier(interpret: bool):
  """Block-wide barrier between workspace writes and reads (GPU only).

  Threads of one program may own different elements in the store and load
  layouts; the interpreter runs a program as one sequential function and has
  no lowering for the primitive, so it gets none.
  """
  if not interpret:
    from jax.experimental.pallas import triton as pltriton  # pylint: disable=g-import-not-at-top
    pltriton.debug_barrier()


def _fwd_kernel(x_ref, dt_ref, a_ref, b_ref, c_ref, y_ref, hs_ref, *,
                chunk: int, n_chunks: int):
  """One (batch, channel block) program of the forward scan.

  Refs (batch squeezed): x, dt, y: [Lp, bd]; a: [bd, N]; b, c: [Lp, N];
  hs: [n_chunks, bd, N], written with the state entering each chunk.
  """
  A = a_ref[...]

  def chunk_body(ci, h):
    hs_ref[ci] = h

    def step(k, h):
      t = ci * chunk + k
      dt = dt_ref[t]
      h = (jnp.exp(dt[:, None] * A) * h
           + (dt * x_ref[t])[:, None] * b_ref[t][None, :])
      y_ref[t] = jnp.sum(h * c_ref[t][None, :], axis=1)
      return h

    return lax.fori_loop(0, chunk, step, h)

  lax.fori_loop(0, n_chunks, chunk_body, jnp.zeros(A.shape, jnp.float32))


def _bwd_kernel(x_ref, dt_ref, a_ref, b_ref, c_ref, hs_ref, dy_ref,
                dx_ref, ddt_ref, da_ref, db_ref, dc_ref, ws_ref, *,
                chunk: int, n_chunks: int, interpret: bool):
  """One (batch, channel block) program of the backward scan.

  Refs (batch / block axes squeezed): x, dt, dy, dx, ddt: [Lp, bd];
  a, da: [bd, N]; b, c, db, dc: [Lp, N]; hs: [n_chunks, bd, N];
  ws: [chunk, bd, N] workspace, ws[k] = state entering step k of the chunk.
  """
  A = a_ref[...]

  def chunk_body(i, carry):
    ci = n_chunks - 1 - i
    t0 = ci * chunk

    def recompute(k, h):
      t = t0 + k
      ws_ref[k] = h
      dt = dt_ref[t]
      return (jnp.exp(dt[:, None] * A) * h
              + (dt * x_ref[t])[:, None] * b_ref[t][None, :])

    lax.fori_loop(0, chunk, recompute, hs_ref[ci])
    _barrier(interpret)

    def step(k, carry):
      g, dA = carry  # g: dL/dh_t from steps after t; dA: running sum
      kk = chunk - 1 - k
      t = t0 + kk
      dt, x, dy = dt_ref[t], x_ref[t], dy_ref[t]
      b, c = b_ref[t], c_ref[t]
      h_prev = ws_ref[kk]
      decay = jnp.exp(dt[:, None] * A)
      dtx = dt * x
      h = decay * h_prev + dtx[:, None] * b[None, :]
      dc_ref[t] = jnp.sum(dy[:, None] * h, axis=0)
      g = g + dy[:, None] * c[None, :]  # now the total dL/dh_t
      db_ref[t] = jnp.sum(g * dtx[:, None], axis=0)
      g_b = jnp.sum(g * b[None, :], axis=1)  # dL/d(dt * x)
      dx_ref[t] = g_b * dt
      # dL/d(dt * A): through the decay, which multiplies h_{t-1}.
      d_dta = g * h_prev * decay
      ddt_ref[t] = g_b * x + jnp.sum(d_dta * A, axis=1)
      return decay * g, dA + d_dta * dt[:, None]

    carry = lax.fori_loop(0, chunk, step, carry)
    # The next chunk's recompute overwrites ws; no thread may still read it.
    _barrier(interpret)
    return carry

  zeros = jnp.zeros(A.shape, jnp.float32)
  _, dA = lax.fori_loop(0, n_chunks, chunk_body, (zeros, zeros))
  da_ref[...] = dA


def _specs(b, lp, d, n, bd, n_chunks):
  """BlockSpecs over grid (batch i, channel block j); None squeezes an axis."""
  seq_d = pl.BlockSpec((None, lp, bd), lambda i, j: (i, 0, j))
  a = pl.BlockSpec((bd, n), lambda i, j: (j, 0))
  seq_n = pl.BlockSpec((None, lp, n), lambda i, j: (i, 0, 0))
  hs = pl.BlockSpec((None, n_chunks, bd, n), lambda i, j: (i, 0, j, 0))
  return seq_d, a, seq_n, hs


def _forward(x, dt, A, B, C, chunk, bd, interpret):
  """Padded inputs -> (y [b, Lp, d], hs [b, n_chunks, d, N])."""
  b, lp, d = x.shape
  n = A.shape[1]
  n_chunks = lp // chunk
  seq_d, a, seq_n, hs = _specs(b, lp, d, n, bd, n_chunks)
  f32 = jnp.float32
  return pl.pallas_call(
      functools.partial(_fwd_kernel, chunk=chunk, n_chunks=n_chunks),
      out_shape=(jax.ShapeDtypeStruct((b, lp, d), f32),
                 jax.ShapeDtypeStruct((b, n_chunks, d, n), f32)),
      grid=(b, d // bd),
      in_specs=[seq_d, seq_d, a, seq_n, seq_n],
      out_specs=(seq_d, hs),
      interpret=interpret,
      compiler_params=_compiler_params(interpret),
      name="selective_scan_fwd",
  )(x, dt, A, B, C)


def _backward(x, dt, A, B, C, hs, dy, chunk, bd, interpret):
  """Padded inputs, boundary states and dy -> (dx, ddt, dA, dB, dC)."""
  b, lp, d = x.shape
  n = A.shape[1]
  nd = d // bd
  n_chunks = lp // chunk
  seq_d, a, seq_n, hs_spec = _specs(b, lp, d, n, bd, n_chunks)
  f32 = jnp.float32
  kernel = functools.partial(_bwd_kernel, chunk=chunk, n_chunks=n_chunks,
                             interpret=interpret)
  part_n = pl.BlockSpec((None, None, lp, n), lambda i, j: (i, j, 0, 0))
  dx, ddt, da, db, dc, _ = pl.pallas_call(
      kernel,
      out_shape=(
          jax.ShapeDtypeStruct((b, lp, d), f32),  # dx
          jax.ShapeDtypeStruct((b, lp, d), f32),  # ddt
          jax.ShapeDtypeStruct((b, d, n), f32),  # dA per batch element
          jax.ShapeDtypeStruct((b, nd, lp, n), f32),  # dB per channel block
          jax.ShapeDtypeStruct((b, nd, lp, n), f32),  # dC per channel block
          jax.ShapeDtypeStruct((b, nd, chunk, bd, n), f32),  # workspace
      ),
      grid=(b, nd),
      in_specs=[seq_d, seq_d, a, seq_n, seq_n, hs_spec, seq_d],
      out_specs=(
          seq_d, seq_d,
          pl.BlockSpec((None, bd, n), lambda i, j: (i, j, 0)),
          part_n, part_n,
          pl.BlockSpec((None, None, chunk, bd, n),
                       lambda i, j: (i, j, 0, 0, 0)),
      ),
      interpret=interpret,
      compiler_params=_compiler_params(interpret),
      name="selective_scan_bwd",
  )(x, dt, A, B, C, hs, dy)
  return dx, ddt, da.sum(0), db.sum(1), dc.sum(1)


@functools.partial(jax.custom_vjp, nondiff_argnums=(5, 6, 7))
def _scan_padded(x, dt, A, B, C, chunk, bd, interpret):
  return _forward(x, dt, A, B, C, chunk, bd, interpret)[0]


def _scan_padded_fwd(x, dt, A, B, C, chunk, bd, interpret):
  y, hs = _forward(x, dt, A, B, C, chunk, bd, interpret)
  return y, (x, dt, A, B, C, hs)


def _scan_padded_bwd(chunk, bd, interpret, res, dy):
  x, dt, A, B, C, hs = res
  return _backward(x, dt, A, B, C, hs, dy.astype(jnp.float32), chunk, bd,
                   interpret)


_scan_padded.defvjp(_scan_padded_fwd, _scan_padded_bwd)


def _on_gpu() -> bool:
  return jax.default_backend() in _GPU_PLATFORMS


def selective_scan_pallas(x, dt, A, B, C, chunk_size: int = 64, *,
                          block_d: int = 32,
                          interpret: bool | None = None) -> jax.Array:
  """Mamba-1 selective scan by Pallas kernels, differentiable (custom_vjp).

  Same contract as `selective_scan.selective_scan_ref` (no D term).

  Args:
    x: [b, L, d] float32.
    dt: [b, L, d] float32, > 0 (softplus and bias already applied).
    A: [d, N] float32, negative.
    B: [b, L, N] float32.
    C: [b, L, N] float32.
    chunk_size: time steps between saved states; the backward recomputes one
      chunk at a time and holds a [b, chunk, d, N] workspace. L need not be a
      multiple of it.
    block_d: channels per program, a power of 2 (Triton's load/store sizes);
      capped at the next power of 2 >= d so a small d is not padded far.
    interpret: run the kernels in the Pallas interpreter; None means
      interpret unless the default backend is a GPU.

  Returns:
    y: [b, L, d] float32.
  """
  scan_utils.check_chunk_size(chunk_size)
  if not isinstance(block_d, int) or block_d < 1 or block_d & (block_d - 1):
    raise ValueError(f"block_d must be a power of 2, got {block_d!r}")
  if interpret is None:
    interpret = not _on_gpu()
  f32 = lambda a: jnp.asarray(a, jnp.float32)
  x, dt, A, B, C = map(f32, (x, dt, A, B, C))
  length, d = x.shape[1], x.shape[2]
  n = A.shape[1]
  bd = min(block_d, _next_pow2(d))
  (x, dt, B, C), _ = scan_utils.pad_time([x, dt, B, C], chunk_size)
  pad_d = -d % bd
  pad_n = _next_pow2(n) - n
  x, dt = (jnp.pad(a, [(0, 0), (0, 0), (0, pad_d)]) for a in (x, dt))
  A = jnp.pad(A, [(0, pad_d), (0, pad_n)])
  B, C = (jnp.pad(a, [(0, 0), (0, 0), (0, pad_n)]) for a in (B, C))
  y = _scan_padded(x, dt, A, B, C, chunk_size, bd, bool(interpret))
  return y[:, :length, :d]


def pallas_available(platform: str | None = None) -> tuple[bool, str]:
  """Whether the compiled (not interpreted) kernels can run on `platform`.

  Args:
    platform: a JAX platform name ("cpu", "gpu", "cuda", "rocm", "tpu");
      None means `jax.default_backend()`.

  Returns:
    (usable, reason): reason is a one-line explanation, naming what is
    missing when usable is False.
  """
  if platform is None:
    platform = jax.default_backend()
  if platform not in _GPU_PLATFORMS:
    return False, (f"platform {platform}: no GPU; Pallas runs only in "
                   "interpret mode here")
  try:
    # The public Triton API and the jaxlib bindings its lowering imports.
    for module in ("jax.experimental.pallas.triton",
                   "jax._src.pallas.triton.pallas_call_registration"):
      importlib.import_module(module)
  except ImportError as e:
    return False, f"platform {platform}: Pallas Triton lowering missing ({e})"
  try:
    devices = jax.devices("gpu")
  except RuntimeError as e:
    return False, f"platform {platform}: no GPU device visible ({e})"
  cc = getattr(devices[0], "compute_capability", None)
  if cc is not None and platform != "rocm":
    try:
      if float(cc) < _MIN_COMPUTE_CAPABILITY:
        return False, (f"platform {platform}: compute capability {cc} < "
                       f"{_MIN_COMPUTE_CAPABILITY} (kernels target sm_80+)")
    except ValueError:
      pass
  return True, (f"platform {platform}: Pallas Triton lowering on "
                f"{devices[0].device_kind}")
