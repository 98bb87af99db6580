"""Selective-scan operations: Mamba-1 `selective_scan` and Mamba-2 `ssd`.

Both take `backend=` one of `BACKENDS`: "sequential" (lax.scan reference),
"associative" (lax.associative_scan) or "chunked" (checkpointed chunks, low
memory for training).
"""

from genemamba_jax.ops.scan_utils import BACKENDS
from genemamba_jax.ops.selective_scan import selective_scan
from genemamba_jax.ops.ssd import ssd

__all__ = ["BACKENDS", "selective_scan", "ssd"]
