"""Selective-scan operations: Mamba-1 `selective_scan` and Mamba-2 `ssd`.

Both take `backend=` one of `SELECTABLE`: the XLA backends in `BACKENDS`,
"sequential" (lax.scan reference), "associative" (lax.associative_scan) and
"chunked" (checkpointed chunks, low memory for training); the kernels, "pallas"
(GPU, `pallas_scan.py`; `pallas_scan.interpreted()` runs it in Pallas's interpreter) and
"numba" (CPU, `cpu_scan.py`), both Mamba-1 only; and "auto", which picks per
platform.
"""

from genemamba_jax.ops.scan_utils import BACKENDS, SELECTABLE
from genemamba_jax.ops.selective_scan import selective_scan
from genemamba_jax.ops.ssd import ssd

__all__ = ["BACKENDS", "SELECTABLE", "selective_scan", "ssd"]
