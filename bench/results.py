"""bench/RESULTS.md: each benchmark script owns one `## ` section and replaces it when re-run."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from genemamba_jax.files import write_bytes_atomic  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "RESULTS.md"


def write_section(heading: str, text: str, path: Path = RESULTS,
                  replaces: tuple[str, ...] = ()) -> Path:
  """Replaces the section that starts with the line `heading` (up to the next `## ` heading or
  the end) by `text`, or appends `text` if there is no such section; the sections headed by
  `replaces` (e.g. a placeholder) are removed. Written atomically."""
  old = path.read_text(encoding="utf-8") if path.exists() else "# Benchmark results\n"
  section = lambda title: re.compile("^" + re.escape(title) + r"\n.*?(?=^## |\Z)",
                                     re.DOTALL | re.MULTILINE)
  for title in replaces:
    old = section(title).sub("", old)
  pattern = section(heading)
  block = text.strip("\n") + "\n\n"
  new = (pattern.sub(lambda _: block, old, count=1) if pattern.search(old)
         else old.rstrip("\n") + "\n\n" + block)
  write_bytes_atomic(path, (new.rstrip("\n") + "\n").encode("utf-8"))
  print(f"wrote {path}")
  return path


def machine() -> str:
  """CPU model (with its vector width: VMs often report a generic name), cores, and the
  versions of python, jax and torch (when imported) with torch's thread count."""
  try:
    info = subprocess.run(["lscpu"], capture_output=True, text=True, check=True).stdout
    fields = dict(line.split(":", 1) for line in info.splitlines() if ":" in line)
    model = fields.get("Model name", "?").strip()
    flags = fields.get("Flags", "").split()
    model += " (AVX-512)" if "avx512f" in flags else " (AVX2)" if "avx2" in flags else ""
    cpus = fields.get("CPU(s)", str(os.cpu_count())).strip()
  except (OSError, subprocess.CalledProcessError):
    model, cpus = "?", str(os.cpu_count())
  line = f"{model}, {cpus} cores; python {sys.version.split()[0]}"
  if "jax" in sys.modules:
    jax = sys.modules["jax"]
    line += f", jax {jax.__version__} ({jax.default_backend()})"
  if "torch" in sys.modules:
    torch = sys.modules["torch"]
    line += f", torch {torch.__version__} ({torch.get_num_threads()} threads)"
  return line
