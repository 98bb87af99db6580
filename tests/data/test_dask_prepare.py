"""`prepare medians / tokenize --dask-scheduler`: a real scheduler and 2 worker processes on
127.0.0.1 (started and stopped here) give the single-process output byte for byte, survive a
worker killed mid-job, and refuse a worker that does not see the output directory."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from genemamba_jax import prepare
from tests.conftest import _require_shared_data, require_dask

distributed = require_dask()

CELLS_PER_UNIT = "50"  # Kang's 1,556 cells -> 32 tokenize units: a kill lands mid-job
MEDIAN_CELLS_PER_UNIT = "400"  # 4 units, 2 per worker: their digests arrive out of order


def _dask(*args: str, cwd: Path, prefix: tuple = ()) -> subprocess.Popen:
  return subprocess.Popen([*prefix, sys.executable, "-m", "dask", *args], cwd=cwd,
                          stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def _worker(address: str, cwd: Path, prefix: tuple = ()) -> subprocess.Popen:
  # No nanny: the process started is the worker, so killing it really loses the worker.
  return _dask("worker", address, "--nthreads", "1", "--no-nanny", "--no-dashboard",
               "--host", "127.0.0.1", cwd=cwd, prefix=prefix)


def _stop(procs) -> None:
  for p in procs:
    if p.poll() is None:
      p.terminate()
  for p in procs:
    try:
      p.wait(10)
    except subprocess.TimeoutExpired:
      p.kill()
      p.wait()


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
  """(scheduler address, a Client, the worker processes) of a fresh 2-worker cluster."""
  here = tmp_path_factory.mktemp("dask")
  scheduler_file = here / "scheduler.json"
  procs = [_dask("scheduler", "--host", "127.0.0.1", "--port", "0", "--dashboard-address", ":0",
                 "--scheduler-file", str(scheduler_file), cwd=here)]
  try:
    deadline = time.time() + 60
    while not scheduler_file.exists() and time.time() < deadline:
      time.sleep(0.2)
    address = json.loads(scheduler_file.read_text())["address"]
    workers = [_worker(address, here) for _ in range(2)]  # cwd elsewhere: paths must be absolute
    procs += workers
    with distributed.Client(address, timeout=30, set_as_default=False) as client:
      client.wait_for_workers(2, timeout=60)
      yield address, client, workers
  finally:
    _stop(procs[::-1])


@pytest.fixture(scope="module")
def kang():
  return str(_require_shared_data() / "kang_pbmc_ifnb.h5ad")


def _prepare(*argv) -> None:
  assert prepare.main([str(a) for a in argv]) == 0


def _files(folder: Path) -> dict[str, bytes]:
  return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*"))
          if p.is_file()}


@pytest.fixture(scope="module")
def single(tmp_path_factory, kang):
  """Vocabulary and tokens of the single-process run."""
  out = tmp_path_factory.mktemp("single")
  _prepare("medians", "--input", kang, "--gene-column", "ensembl_id", "--out", out / "vocab",
           "--cells-per-shard", MEDIAN_CELLS_PER_UNIT)
  _prepare(*_tokenize_args(kang, out / "vocab", out / "tokens"))
  return out


def _tokenize_args(kang, vocab, out, *extra):
  return ("tokenize", "--input", kang, "--gene-column", "ensembl_id", "--vocab", vocab,
          "--out", out, "--cells-per-shard", CELLS_PER_UNIT, "--label-column", "cell_type",
          "--batch-column", "sample", "--cls", "--max-len", "256", *extra)


@pytest.mark.slow
def test_medians_equal_single_process(cluster, single, kang, tmp_path):
  _prepare("medians", "--input", kang, "--gene-column", "ensembl_id", "--out", tmp_path / "v",
           "--cells-per-shard", MEDIAN_CELLS_PER_UNIT, "--dask-scheduler", cluster[0])
  assert _files(tmp_path / "v") == _files(single / "vocab")


@pytest.mark.slow
def test_tokens_equal_single_process(cluster, single, kang, tmp_path):
  _prepare(*_tokenize_args(kang, single / "vocab", tmp_path / "t", "--dask-scheduler",
                           cluster[0]))
  assert _files(tmp_path / "t") == _files(single / "tokens")  # shards, sidecars and manifest


# What a third worker sees at the client's folder `shared`: another machine's empty folder, or
# the same folder read-only.
VIEWS = {"cannot see the output directory": 'mount -t tmpfs none "{0}"',
         "cannot write to the output directory": 'mount --bind "{0}" "{0}" && '
                                                 'mount -o remount,ro,bind "{0}"'}


@pytest.mark.slow
@pytest.mark.parametrize("problem", list(VIEWS))
def test_worker_that_cannot_see_or_write_the_output_is_refused(cluster, single, kang, tmp_path,
                                                               capsys, problem):
  if subprocess.run(["unshare", "-rm", "true"], capture_output=True).returncode != 0:
    pytest.skip("needs `unshare -rm` (user namespaces) to give a worker its own view of a folder")
  shared = tmp_path / "shared"
  shared.mkdir()
  address, client, _ = cluster
  hidden = _worker(address, tmp_path, prefix=(
      "unshare", "-rm", "sh", "-c", VIEWS[problem].format(shared) + ' && exec "$0" "$@"'))
  try:
    client.wait_for_workers(3, timeout=60)
    status = prepare.main([str(a) for a in _tokenize_args(
        kang, single / "vocab", shared / "t", "--dask-scheduler", address)])
  finally:
    _stop([hidden])
  err = capsys.readouterr().err
  assert status == 2
  assert f"{problem} {shared / 't'}" in err
  assert "shared" in err.splitlines()[-1].split(";")[1]  # says what to do
  assert "Traceback" not in err
  assert not (shared / "t").exists()  # nothing left that a re-run trips over
  deadline = time.time() + 30
  while len(client.scheduler_info()["workers"]) > 2 and time.time() < deadline:
    time.sleep(0.2)


@pytest.mark.slow
def test_killing_a_worker_mid_job_still_completes(cluster, single, kang, tmp_path):
  address, client, workers = cluster
  out = tmp_path / "t"
  job = subprocess.Popen([sys.executable, "-m", "genemamba_jax.prepare",
                          *map(str, _tokenize_args(kang, single / "vocab", out,
                                                   "--dask-scheduler", address))],
                         stderr=subprocess.PIPE, text=True)
  try:
    pids = client.run(os.getpid)
    victim = None
    deadline = time.time() + 60
    while victim is None and time.time() < deadline and job.poll() is None:
      if list((out / "shards").glob("*.json")):  # under way: shards are being finished
        busy = [w for w, keys in client.processing().items() if keys and w in pids]
        if busy:
          victim = pids[busy[0]]
      time.sleep(0.05)
    assert victim is not None, "the job ended before a worker could be killed mid-job"
    assert not (out / "manifest.json").exists()
    os.kill(victim, signal.SIGKILL)
    assert job.wait(120) == 0, job.stderr.read()
  finally:
    _stop([job])
  assert any(w.poll() is not None for w in workers)  # one of the two is really gone
  assert _files(out) == _files(single / "tokens")


def test_unreachable_scheduler_is_one_line(capsys, tmp_path, kang):
  import dask  # pylint: disable=g-import-not-at-top
  with dask.config.set({"distributed.comm.timeouts.connect": "1s"}):
    status = prepare.main(["medians", "--input", kang, "--gene-column", "ensembl_id", "--out",
                           str(tmp_path / "v"), "--dask-scheduler", "tcp://127.0.0.1:9"])
  err = capsys.readouterr().err
  assert status == 2
  line = err.strip().splitlines()[-1]
  assert line.startswith("error: --dask-scheduler tcp://127.0.0.1:9: no Dask scheduler answered "
                         "within 1 s") and "dask scheduler" in line
  assert not (tmp_path / "v").exists()


@pytest.mark.slow
def test_scheduler_without_workers_is_one_line(capsys, tmp_path, kang):
  scheduler_file = tmp_path / "scheduler.json"
  scheduler = _dask("scheduler", "--host", "127.0.0.1", "--port", "0", "--dashboard-address",
                    ":0", "--scheduler-file", str(scheduler_file), cwd=tmp_path)
  try:
    deadline = time.time() + 60
    while not scheduler_file.exists() and time.time() < deadline:
      time.sleep(0.2)
    address = json.loads(scheduler_file.read_text())["address"]
    import dask  # pylint: disable=g-import-not-at-top
    with dask.config.set({"distributed.comm.timeouts.connect": "2s"}):
      status = prepare.main(["medians", "--input", kang, "--out", str(tmp_path / "v"),
                             "--dask-scheduler", address])
  finally:
    _stop([scheduler])
  assert status == 2
  assert capsys.readouterr().err.strip().splitlines()[-1] == (
      f"error: --dask-scheduler {address}: the scheduler has no worker after 2 s; start some "
      f"with `dask worker {address}`")
  assert not (tmp_path / "v").exists()


def test_missing_dask_says_how_to_install(capsys, tmp_path, kang, monkeypatch):
  monkeypatch.setitem(sys.modules, "distributed", None)  # what an absent package raises
  status = prepare.main(["tokenize", "--input", kang, "--vocab", str(tmp_path / "v"), "--out",
                         str(tmp_path / "t"), "--dask-scheduler", "tcp://127.0.0.1:8786"])
  assert status == 2
  assert capsys.readouterr().err == ('error: --dask-scheduler needs dask.distributed, which is '
                                     'not installed; pip install -e ".[dask]" (on the client and '
                                     'every worker)\n')
  assert not os.path.exists(tmp_path / "t")
