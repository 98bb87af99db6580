"""Mamba-2 scan (state space duality, mamba_ssm `ssd` semantics) in JAX.

One scalar decay per head, head dim P, B/C shared by groups of heads:

  h_t = exp(dt_t * A) * h_{t-1} + dt_t * x_t (outer) B_t   (state [b, H, P, N])
  y_t = h_t @ C_t (+ D * x_t)

Backends, all with a float32 state:

  sequential   `lax.scan` over time; the reference and test oracle.
  associative  `lax.associative_scan` over (decay, input) pairs; the decay
               stays [.., H, 1, 1] so combines are cheap, but inputs and
               states are materialised as [b, L, H, P, N].
  chunked      the SSD matmul form (mamba_ssm `ssd_minimal_discrete`): within
               a chunk, y = (C B^T * exp(cum_i - cum_j)) (dt x) plus the carried
               state read out through C; a `lax.scan` over chunks carries the
               state, `jax.checkpoint` per chunk keeps only boundary states
               [L / chunk, b, H, P, N] and O(b*L*H*P) activations for the
               backward.

The chunked einsums use JAX's default matmul precision: exact float32 on CPU
(the tests), TF32 on recent GPUs unless run under
`jax.default_matmul_precision("highest")`.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from genemamba_jax.ops import scan_utils


def _heads(a, n_heads):
  """Group tensor [b, L, G, N] -> per-head [b, L, H, N] (head h uses h // (H//G))."""
  return jnp.repeat(a, n_heads // a.shape[2], axis=2)


def ssd_ref(x, dt, A, B, C, chunk_size=None):
  """The reference SSD scan (one `lax.scan` step per token), the other backends' test oracle.

  All float32; x: [b, L, H, P], dt: [b, L, H], A: [H], B, C: [b, L, G, N] -> y [b, L, H, P]
  (no D term); `chunk_size` is ignored (the backends' common signature).
  """
  del chunk_size
  b, _, n_heads, p = x.shape
  B, C = _heads(B, n_heads), _heads(C, n_heads)

  def step(h, xs):
    x_t, dt_t, b_t, c_t = xs  # [b, H, P], [b, H], [b, H, N], [b, H, N]
    decay = jnp.exp(dt_t * A)[..., None, None]
    h = decay * h + (dt_t[..., None] * x_t)[..., None] * b_t[:, :, None]
    return h, jnp.einsum("bhpn,bhn->bhp", h, c_t)

  h0 = jnp.zeros((b, n_heads, p, B.shape[-1]), jnp.float32)
  time_major = [jnp.moveaxis(a, 1, 0) for a in (x, dt, B, C)]
  _, y = jax.lax.scan(step, h0, time_major)
  return jnp.moveaxis(y, 0, 1)


def _associative(x, dt, A, B, C, chunk_size):
  del chunk_size
  B, C = _heads(B, x.shape[2]), _heads(C, x.shape[2])
  decay = jnp.exp(dt * A)[..., None, None]  # [b, L, H, 1, 1]
  inp = (dt[..., None] * x)[..., None] * B[:, :, :, None]  # [b, L, H, P, N]
  _, h = jax.lax.associative_scan(scan_utils.linear_combine, (decay, inp), axis=1)
  return jnp.einsum("blhpn,blhn->blhp", h, C)


def _cumsum_over_time(a):
  """Inclusive cumulative sum over axis 1 of a [b, T, H], as a matmul with a triangular matrix.

  XLA:CPU lowers `jnp.cumsum` to a reduce-window, O(T^2) scalar work per row
  that showed in the train step's profile (bench/NOTES.md); a [T, T] matmul runs on the matmul
  library instead. HIGHEST precision keeps it float32-exact on GPUs (no TF32).
  """
  t = a.shape[1]
  tri = jnp.tril(jnp.ones((t, t), jnp.float32))
  return jnp.einsum("bjh,ij->bih", a, tri, precision=jax.lax.Precision.HIGHEST)


def _decay_matrix(cum):
  """exp(cum[i] - cum[j]) for j <= i, else 0: [..., T] -> [..., T, T].

  The masked entries are exp(-inf) = 0 rather than a select after the exp, so
  they neither overflow nor put NaNs in the gradient. Differences of float32
  cumulative sums are what mamba_ssm's chunk-scan kernel uses too; the error is
  ~1e-7 of the chunk's total log-decay.
  """
  t = cum.shape[-1]
  keep = jnp.tril(jnp.ones((t, t), bool))
  return jnp.exp(jnp.where(keep, cum[..., :, None] - cum[..., None, :], -jnp.inf))


def _chunked(x, dt, A, B, C, chunk_size):
  """The SSD matmul form chunk by chunk (mamba_ssm `ssd_minimal_discrete`), under a scan.

  Within a chunk of T steps, for head h in group g:

    y[i] = sum_{j <= i} (C_i . B_j) exp(cum_i - cum_j) dt_j x_j + exp(cum_i) C_i . h0
    h_end = exp(cum_T) h0 + sum_j exp(cum_T - cum_j) dt_j x_j (outer) B_j

  A `lax.scan` carries the state [b, H, P, N] across chunks and `jax.checkpoint` per chunk
  keeps only the boundary states and O(b*L*H*P) inputs for the backward. Measured against
  all chunks at once as batched matmuls (the form with no loop): as fast at L = 512 and
  faster at L >= 2048 on CPU, with half the memory (bench/RESULTS.md).

  Shapes: x [b, L, H, P], dt [b, L, H], A [H], B/C [b, L, G, N], all float32.
  """
  scan_utils.check_chunk_size(chunk_size)
  b, length, n_heads, p = x.shape
  g, n = B.shape[2:]
  k = n_heads // g
  t = chunk_size
  (x, dt, B, C), _ = scan_utils.pad_time([x, dt, B, C], chunk_size)

  def chunk(h0, xs):
    """h0: [b, H, P, N]; xs: one chunk, x [b, T, H, P], dt [b, T, H], B/C [b, T, G, N]."""
    x_c, dt_c, b_c, c_c = xs
    cum = _cumsum_over_time(dt_c * A)  # [b, T, H] log-decay from the chunk start
    xdt = (x_c * dt_c[..., None]).reshape(b, t, g, k, p)
    # Intra-chunk (diagonal block): y_l = sum_{s<=l} C_l.B_s * decay(s->l) * xdt_s.
    cum_h = jnp.moveaxis(cum, 1, -1)  # [b, H, T]
    decay_ls = _decay_matrix(cum_h).reshape(b, g, k, t, t)
    cb = jnp.einsum("blgn,bsgn->bgls", c_c, b_c)  # [b, G, T, T]
    # One copy of C B^T per head of the group, by concatenation rather than broadcasting:
    # the backward of a broadcast is a reduce over the head axis, which XLA:CPU's fused
    # reduce ran at a fraction of memory speed (bench/NOTES.md); a
    # concatenation's backward is slices and adds.
    cb = jnp.concatenate([cb[:, :, None]] * k, axis=2)  # [b, G, K, T, T]
    y_diag = jnp.einsum("bgkls,bsgkp->blgkp", cb * decay_ls, xdt)
    # Carried state read out at each step, decayed from the chunk start.
    h0g = h0.reshape(b, g, k, p, n)
    y_off = jnp.einsum("blgn,bgkpn,blgk->blgkp", c_c, h0g, jnp.exp(cum).reshape(b, t, g, k))
    # State at the chunk end: carried state decayed + this chunk's inputs.
    decay_to_end = jnp.exp(cum[:, -1:] - cum).reshape(b, t, g, k)
    h_local = jnp.einsum("bsgn,bsgk,bsgkp->bgkpn", b_c, decay_to_end, xdt)
    h_end = jnp.exp(cum[:, -1])[..., None, None] * h0 + h_local.reshape(b, n_heads, p, n)
    return h_end, (y_diag + y_off).reshape(b, t, n_heads, p)

  # prevent_cse is unneeded under scan and only blocks optimisations.
  chunk = jax.checkpoint(chunk, prevent_cse=False)
  h0 = jnp.zeros((b, n_heads, p, n), jnp.float32)
  xs = [scan_utils.to_chunks(a, chunk_size) for a in (x, dt, B, C)]
  _, y = jax.lax.scan(chunk, h0, xs)
  return scan_utils.from_chunks(y)[:, :length]


def _no_kernel(x, dt, A, B, C, chunk_size):
  """Mamba-2 has no Pallas kernel: its chunked SSD form is already matmuls, which XLA runs
  on tensor cores; `auto` and `pallas` take it."""
  if jax.default_backend() in ("gpu", "cuda", "rocm"):
    scan_utils.log_fallback("pallas (Mamba-2 ssd)", "chunked",
                            "the SSD has no Pallas kernel; its chunked form is matmuls")
  return _chunked(x, dt, A, B, C, chunk_size)


_IMPLS = {
    "sequential": ssd_ref,
    "associative": _associative,
    "chunked": _chunked,
    "pallas": _no_kernel,
    "numba": _no_kernel,
    "auto": _chunked,
}


def ssd(x, dt, A, B, C, D=None, *, backend="associative", chunk_size=64):
  """Mamba-2 scan: scalar A per head, head dim P, grouped B/C (mamba_ssm ssd).

  h_t = exp(dt_t * A) * h_{t-1} + dt_t * x_t outer B_t (state [batch, H, P, N],
  float32, h_{-1} = 0); y_t = h_t @ C_t (+ D * x_t).

  Args:
    x: [batch, L, H, P], compute dtype.
    dt: [batch, L, H], float32, > 0 (softplus and bias applied).
    A: [H], float32, negative.
    B: [batch, L, G, N], compute dtype; H % G == 0, head h uses group
      h // (H // G).
    C: [batch, L, G, N], compute dtype.
    D: [H] or None, skip connection.
    backend: one of `scan_utils.SELECTABLE`; "auto" and "pallas" are "chunked"
      (no Pallas kernel for the SSD).
    chunk_size: time steps per chunk (chunked backend only); L need not be a
      multiple of it.

  Returns:
    y: [batch, L, H, P] in x.dtype, accumulated in float32.
  """
  impl = scan_utils.get_backend(_IMPLS, backend)
  if x.shape[2] % B.shape[2]:
    raise ValueError(f"heads H={x.shape[2]} not a multiple of groups G={B.shape[2]}")
  # float32 throughout (state, exp, cumsum); only the output goes back to x.dtype.
  f32 = lambda a: jnp.asarray(a, jnp.float32)
  xf = f32(x)
  y = impl(xf, f32(dt), f32(A), f32(B), f32(C), chunk_size)
  if D is not None:
    y = y + f32(D)[:, None] * xf
  return y.astype(x.dtype)
