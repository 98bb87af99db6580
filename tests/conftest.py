"""Shared pytest fixtures."""

import os
import shutil
import signal
import sys
import warnings
from collections.abc import Callable
from pathlib import Path

import filelock
import pytest

# One persistent JAX compilation cache (xdist workers and the commands the tests start inherit it
# through the environment): the tests build the same small models and steps many times, and a
# cached compile takes a fraction of a fresh one. It lives in .pytest_cache, so the edit-test
# loop finds it warm (bench/RESULTS.md, "Test suite"), and `pytest --cache-clear` empties it.
# Entries are keyed by the program, JAX's version and its flags, so a stale one is never used.
_CACHE_ENV = "JAX_COMPILATION_CACHE_DIR"
CACHE_DIR = Path(__file__).resolve().parents[1] / ".pytest_cache" / "jax-compilation-cache"


def pytest_configure(config):
  del config
  if os.environ.get(_CACHE_ENV):  # set by the user or by the controlling process
    return
  # Every compile outside CI, where the next run reads them back; under CI (a fresh clone, the
  # cache dies with it) only those over 0.1 s, as writing the many tiny ones costs more there.
  min_seconds = 0.1 if os.environ.get("CI") == "true" else 0.0
  settings = {
      "jax_compilation_cache_dir": str(CACHE_DIR),
      "jax_persistent_cache_min_compile_time_secs": min_seconds,
      "jax_persistent_cache_min_entry_size_bytes": 0,
      # A size limit turns on the cache's file lock (processes never read a half-written entry)
      # and evicts the least recently used entries beyond it.
      "jax_compilation_cache_max_size": 1 << 30,
  }
  CACHE_DIR.mkdir(parents=True, exist_ok=True)
  for name, value in settings.items():
    os.environ[name.upper()] = str(value)
    if "jax" in sys.modules:  # jax reads the environment when it is imported
      sys.modules["jax"].config.update(name, value)


@pytest.fixture(autouse=True)
def _default_signal_handlers(request):
  """Each test starts with Python's Ctrl-C and SIGTERM handlers, whatever came before.

  A shell starts background jobs (`pytest &`, `nohup`) with SIGINT ignored, and the commands the
  tests start inherit the disposition: their Ctrl-C tests would then see commands that ignore
  Ctrl-C. A test that leaves other handlers behind (the package must not) is named in a warning.
  """
  defaults = {signal.SIGINT: signal.default_int_handler, signal.SIGTERM: signal.SIG_DFL}
  for signum, handler in defaults.items():
    signal.signal(signum, handler)
  yield
  for signum, handler in defaults.items():
    if signal.getsignal(signum) != handler:
      warnings.warn(f"{request.node.nodeid} left the {signal.Signals(signum).name} handler "
                    f"{signal.getsignal(signum)!r}", RuntimeWarning)
      signal.signal(signum, handler)


def fast_first(names: str, values, n: int = 1, **kwargs):
  """pytest.mark.parametrize(names, values) with only the first `n` values in the fast tier: the
  others (the same check on more variants) are marked slow, so `-m "not slow"` keeps one."""
  several = "," in names
  return pytest.mark.parametrize(names, [
      v if i < n else pytest.param(*(v if several else (v,)), marks=pytest.mark.slow)
      for i, v in enumerate(values)], **kwargs)


# The shared real-data folder sits beside the project root (../shared/data).
SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"


def _require_shared_data() -> Path:
  """Path of the shared real-data folder; skips (fails on CI) when missing."""
  if not SHARED_DATA.is_dir():
    reason = (f"shared test data not found at {SHARED_DATA}; it is expected "
              "beside the project root as ../shared/data")
    if os.environ.get("CI", "").lower() == "true":
      pytest.fail(reason)
    pytest.skip(reason)
  return SHARED_DATA


PARITY_INSTALL = ("pip install torch --index-url https://download.pytorch.org/whl/cpu, then "
                  "pip install -e '.[test,parity]' (README, Quickstart)")


def require_parity(package: str):
  """Imports a package of the `parity` extra (torch, transformers, mambapy) for a test that
  compares against PyTorch; skips with how to install it when missing (fails on CI, which
  installs it, so the parity tests can never be skipped there silently)."""
  try:
    return __import__(package)
  except ImportError:
    reason = f"this parity test needs {package}: {PARITY_INSTALL}"
    if os.environ.get("CI", "").lower() == "true":
      pytest.fail(reason)
    pytest.skip(reason, allow_module_level=True)


@pytest.fixture(scope="session")
def tiledbsoma():
  """The tiledbsoma module (the `soma` extra); skips with how to install it when missing (fails
  on CI, which installs it)."""
  try:
    import tiledbsoma as module  # pylint: disable=g-import-not-at-top
  except ImportError:
    reason = "the SOMA input tests need tiledbsoma: pip install -e '.[test,soma]'"
    if os.environ.get("CI", "").lower() == "true":
      pytest.fail(reason)
    pytest.skip(reason)
  return module


DASK_INSTALL = 'pip install -e ".[test,dask]" (README, "Scaling out")'


def require_dask():
  """dask.distributed for a test that runs a Dask cluster; skips with how to install it when
  missing (fails on CI, which installs the `dask` extra)."""
  try:
    return __import__("distributed")
  except ImportError:
    reason = f"this test needs dask.distributed: {DASK_INSTALL}"
    if os.environ.get("CI", "").lower() == "true":
      pytest.fail(reason)
    pytest.skip(reason, allow_module_level=True)


def build_once(tmp_path_factory, name: str, build: Callable[[Path], Path]) -> Path:
  """`build(folder)`'s result, built once per test session even under pytest-xdist: the first
  worker builds into a folder every worker sees (under a lock), the others wait and reuse it.
  What it builds is read-only to the tests (as a session fixture's result always is)."""
  base = tmp_path_factory.getbasetemp()
  root = base.parent if os.environ.get("PYTEST_XDIST_WORKER") else base  # parent: all workers'
  folder = root / f"shared_{name}"
  with filelock.FileLock(str(folder) + ".lock"):
    done = folder / ".built"
    if not done.exists():
      shutil.rmtree(folder, ignore_errors=True)  # a worker that failed half-way
      folder.mkdir()
      result = build(folder)
      done.write_text(str(result.relative_to(folder)))
  return folder / done.read_text()


@pytest.fixture
def shared_data() -> Path:
  """Path of the shared real-data folder; skips (fails on CI) when missing."""
  return _require_shared_data()


@pytest.fixture(scope="session")
def kang_pretrained(tmp_path_factory) -> Path:
  """Run directory of a small GeneMamba pretrained on the Kang PBMCs (tests/kang.py), once."""
  from tests.kang import pretrain_kang  # pylint: disable=g-import-not-at-top
  data = _require_shared_data()
  return build_once(tmp_path_factory, "kang_pretrain", lambda folder: pretrain_kang(data, folder))


# What `runs/demo` (README, Quickstart) is to the tests: configs/demo.py, made tiny (4 steps,
# d_model 32, 64 tokens a cell) so it trains in seconds.
TINY_DEMO = {"num_steps": 4, "batch_size": 8, "data.max_len": 64, "model.d_model": 32,
             "model.headdim": 16, "model.d_state": 8, "log_every": 1, "eval_every": 4,
             "eval_batches": 1, "checkpoint_every": 4}


@pytest.fixture(scope="session")
def demo_run(tmp_path_factory) -> Path:
  """Run directory of a tiny configs/demo.py run (its data cached in a temporary folder), once."""
  from configs import demo as demo_config  # pylint: disable=g-import-not-at-top
  from genemamba_jax.train import loop  # pylint: disable=g-import-not-at-top

  def build(base: Path) -> Path:
    c = demo_config.get_config()
    for key, value in TINY_DEMO.items():
      *parents, leaf = key.split(".")
      node = c
      for part in parents:
        node = node[part]
      node[leaf] = value
    with pytest.MonkeyPatch.context() as patch:
      patch.setenv("GENEMAMBA_CACHE", str(base / "cache"))
      loop.train_and_evaluate(c, str(base / "run"))
    return base / "run"

  return build_once(tmp_path_factory, "demo_run", build)


@pytest.fixture(scope="session")
def demo_counts(tmp_path_factory) -> Path:
  """The demo's PBMCs (exact counts, obs bulk_labels) as an .h5ad: 300 of the 700 cells, in a
  shuffled order (so input order is not the bundled file's)."""
  from genemamba_jax.data import demo  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top

  def build(folder: Path) -> Path:
    adata = demo.pbmc68k_counts()
    order = np.random.default_rng(0).permutation(adata.n_obs)[:300]
    adata[order].copy().write_h5ad(folder / "pbmc68k_300.h5ad")
    return folder / "pbmc68k_300.h5ad"

  return build_once(tmp_path_factory, "demo_counts", build)


@pytest.fixture(scope="session")
def demo_finetuned(tmp_path_factory, demo_run, demo_counts) -> Path:
  """A fine-tuned run (the finetune command, 4 steps on `demo_counts`' bulk_labels), once."""
  import subprocess  # pylint: disable=g-import-not-at-top
  import sys  # pylint: disable=g-import-not-at-top
  root = Path(__file__).resolve().parents[1]

  def build(base: Path) -> Path:
    result = subprocess.run(
        [sys.executable, "-m", "genemamba_jax.finetune", "--config", "configs/finetune.py",
         "--workdir", str(base / "run"), f"--config.init_checkpoint={demo_run}",
         f"--config.data.input={demo_counts}", "--config.label_column=bulk_labels",
         "--config.num_steps=4", "--config.lr=1e-3", "--config.write_h5ad=false"],
        cwd=root, capture_output=True, text=True, timeout=900, check=False)
    assert result.returncode == 0, result.stderr[-3000:]
    return base / "run"

  return build_once(tmp_path_factory, "demo_finetuned", build)
