"""`prepare medians` and `prepare tokenize`: 1 local process vs 2 Dask workers, one run.

Real Kang PBMCs (`kang_pbmc_ifnb.h5ad`, 1,556 cells x 1,267 genes, Ensembl ids) tiled to
--cells cells in an ordinary CSR .h5ad, split into --cells-per-shard units. Each command runs
in a fresh client process (`python -m genemamba_jax.prepare ...`, timed around the command
inside it): once alone, then against a scheduler and 2 worker processes (1 thread each) on
127.0.0.1, first with freshly started workers (imports and compilation included) and again
with the same, now warm, workers. Outputs are checked byte for byte against the local run.

    python bench/bench_prepare_dask.py [--cells 50000] [--cells-per-shard 5000] [--write]
"""

import argparse
import filecmp
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
import results  # noqa: E402  (bench/results.py)

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "data"
WORK = ROOT / "bench" / "_work" / "dask"
HEADING = "## Preprocessing on a Dask cluster (1 process vs 2 workers)"


def make_file(n_cells: int) -> Path:
  import anndata
  import scipy.sparse as sp
  path = WORK / f"kang_tiled_{n_cells}.h5ad"
  if not path.exists():
    src = anndata.read_h5ad(DATA / "kang_pbmc_ifnb.h5ad")
    X = sp.csr_matrix(src.X)
    tiled = sp.vstack([X] * -(-n_cells // X.shape[0]), format="csr")[:n_cells]
    adata = anndata.AnnData(tiled, var=src.var[["ensembl_id"]])
    adata.obs_names = [f"c{i}" for i in range(n_cells)]
    adata.obs["cell_type"] = np.resize(src.obs["cell_type"].astype(str).to_numpy(), n_cells)
    tmp = path.with_suffix(".tmp.h5ad")
    adata.write_h5ad(tmp)
    os.replace(tmp, path)
  return path


def child(argv) -> None:
  import resource
  from genemamba_jax import prepare
  t0 = time.perf_counter()
  status = prepare.main(argv)
  seconds = time.perf_counter() - t0
  cpu = sum(getattr(resource.getrusage(who), f) for f in ("ru_utime", "ru_stime")
            for who in (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN))
  print(f"RESULT status={status} seconds={seconds:.3f} cpu={cpu:.3f}")


def cpu_seconds(pids) -> float:
  """CPU seconds (user + system) the processes used so far."""
  ticks = os.sysconf("SC_CLK_TCK")
  total = 0
  for pid in pids:
    with open(f"/proc/{pid}/stat") as f:
      fields = f.read().rsplit(")", 1)[1].split()
    total += int(fields[11]) + int(fields[12])  # utime, stime
  return total / ticks


def timed(argv, services=()) -> tuple[float, float]:
  """(wall seconds, CPU seconds of the command and of the `services` processes)."""
  before = cpu_seconds(services)
  res = subprocess.run([sys.executable, __file__, "--child", *map(str, argv)],
                       capture_output=True, text=True, check=False)
  line = [l for l in res.stdout.splitlines() if l.startswith("RESULT")]
  if res.returncode or not line or "status=0" not in line[-1]:
    raise SystemExit(f"{' '.join(map(str, argv[:1]))} failed:\n{res.stderr[-2000:]}")
  fields = dict(kv.split("=") for kv in line[-1].split()[1:])
  return float(fields["seconds"]), float(fields["cpu"]) + cpu_seconds(services) - before


def same_files(a: Path, b: Path) -> bool:
  names = sorted(str(p.relative_to(a)) for p in a.rglob("*") if p.is_file())
  return (names == sorted(str(p.relative_to(b)) for p in b.rglob("*") if p.is_file())
          and all(filecmp.cmp(a / n, b / n, shallow=False) for n in names))


def start_cluster(n_workers: int):
  scheduler_file = WORK / "scheduler.json"
  scheduler_file.unlink(missing_ok=True)
  quiet = dict(stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, cwd=WORK)
  procs = [subprocess.Popen([sys.executable, "-m", "dask", "scheduler", "--host", "127.0.0.1",
                             "--port", "0", "--dashboard-address", ":0", "--scheduler-file",
                             str(scheduler_file)], **quiet)]
  while not scheduler_file.exists():
    time.sleep(0.2)
  address = json.loads(scheduler_file.read_text())["address"]
  procs += [subprocess.Popen([sys.executable, "-m", "dask", "worker", address, "--nthreads", "1",
                              "--no-nanny", "--no-dashboard", "--host", "127.0.0.1"], **quiet)
            for _ in range(n_workers)]
  import distributed
  with distributed.Client(address, timeout=60, set_as_default=False) as client:
    client.wait_for_workers(n_workers, timeout=120)
  return address, procs


def main() -> None:
  parser = argparse.ArgumentParser()
  parser.add_argument("--cells", type=int, default=50_000)
  parser.add_argument("--cells-per-shard", type=int, default=5_000)
  parser.add_argument("--write", action="store_true", help="write the section of RESULTS.md")
  parser.add_argument("--child", nargs=argparse.REMAINDER)
  args = parser.parse_args()
  if args.child:
    return child(args.child)
  WORK.mkdir(parents=True, exist_ok=True)
  data = make_file(args.cells)
  common = ["--input", data, "--gene-column", "ensembl_id", "--cells-per-shard",
            args.cells_per_shard]

  def run(kind: str, tag: str, extra=(), services=()) -> tuple[float, float]:
    out = WORK / f"{kind}_{tag}"
    shutil.rmtree(out, ignore_errors=True)
    if kind == "medians":
      return timed(["medians", *common, "--out", out, *extra], services)
    return timed(["tokenize", *common, "--vocab", WORK / "medians_local", "--out", out,
                  "--label-column", "cell_type", *extra], services)

  load = os.getloadavg()
  busy = load[0] >= 1.0  # another job holds a core: the second worker has none of its own
  rows = {}
  for kind in ("medians", "tokenize"):
    rows[kind] = {"local": run(kind, "local")}
  address, procs = start_cluster(2)
  try:
    for tag in ("cold", "warm"):
      for kind in ("medians", "tokenize"):
        rows[kind][tag] = run(kind, tag, ["--dask-scheduler", address],
                              [p.pid for p in procs])
        assert same_files(WORK / f"{kind}_local", WORK / f"{kind}_{tag}"), (kind, tag)
  finally:
    for p in procs[::-1]:
      p.terminate()
      p.wait()
  load = f"{load[0]:.1f} / {os.getloadavg()[0]:.1f}"
  lines = ["| command | 1 local process | 2 Dask workers, cold | 2 Dask workers, warm | "
           "speed-up (warm) |", "|---|---|---|---|---|"]
  for kind, r in rows.items():
    cells = [f"{r[t][0]:.1f} s (CPU {r[t][1]:.1f} s)" for t in ("local", "cold", "warm")]
    lines.append(f"| `prepare {kind}` | {' | '.join(cells)} | "
                 f"**{r['local'][0] / r['warm'][0]:.2f}x** |")
  print("\n".join(lines))
  print(f"load average before / after: {load}")
  if args.write:
    loaded = (f"**loaded**: the cores were shared with other jobs (load average {load} before / "
              "after), so no core was free for the second worker and the wall times follow the "
              "total CPU" if busy else
              f"quiet: nothing else ran (load average {load} before / after, the bench's own)")
    units = -(-args.cells // args.cells_per_shard)
    extra = ", ".join(f"{k} {r['warm'][1] - r['local'][1]:+.1f} s" for k, r in rows.items())
    results.write_section(HEADING, f"""\
{HEADING}

`python bench/bench_prepare_dask.py --write`: real Kang PBMCs (`kang_pbmc_ifnb.h5ad`, 1,556
cells x 1,267 genes) tiled to {args.cells:,} cells in {units} units of {args.cells_per_shard:,}.
Each command runs in a fresh client process, timed inside it: alone (1
process), then with `--dask-scheduler` against a scheduler and 2 worker processes (1 thread
each) on 127.0.0.1, just started (cold: their imports and numba compilation included) and again
(warm). Every Dask output is byte for byte the local one (checked). Wall seconds, and (CPU) the
CPU seconds of the client process plus, with Dask, those the scheduler and the workers used
meanwhile.

- machine: {results.machine()}
- {loaded}
- date: {time.strftime('%Y-%m-%d')}

{chr(10).join(lines)}

- the cluster's own cost, warm, in CPU seconds against 1 process: {extra}
  (the client's import of dask.distributed and connection, the scheduler, moving results); a
  speed-up needs idle cores or nodes for the workers
""")


if __name__ == "__main__":
  main()
