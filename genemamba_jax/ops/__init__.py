"""Selective-scan operations: Mamba-1 `selective_scan` and Mamba-2 `ssd`.

Both take `backend=` one of `SELECTABLE`: the XLA backends in `BACKENDS`,
"sequential" (the lax.scan reference, public as `selective_scan_ref` / `ssd_ref`), "associative" (lax.associative_scan) and
"chunked" (checkpointed chunks, low memory for training); the kernels, "pallas"
(GPU, `pallas_scan.py`; `pallas_scan.interpreted()` runs it in Pallas's interpreter) and
"numba" (CPU, `cpu_scan.py`), both Mamba-1 only; and "auto", which picks per
platform.
"""

from genemamba_jax.ops.scan_utils import BACKENDS, SELECTABLE
from genemamba_jax.ops.selective_scan import selective_scan, selective_scan_ref
from genemamba_jax.ops.ssd import ssd, ssd_ref

__all__ = ["BACKENDS", "SELECTABLE", "selective_scan", "selective_scan_ref", "ssd", "ssd_ref"]
