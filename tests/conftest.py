"""Shared pytest fixtures."""

import os
from pathlib import Path

import pytest

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


@pytest.fixture
def shared_data() -> Path:
  """Path of the shared real-data folder; skips (fails on CI) when missing."""
  return _require_shared_data()


@pytest.fixture(scope="session")
def kang_pretrained(tmp_path_factory) -> Path:
  """Run directory of a small GeneMamba pretrained on the Kang PBMCs (tests/kang.py), once."""
  from tests.kang import pretrain_kang  # pylint: disable=g-import-not-at-top
  return pretrain_kang(_require_shared_data(), tmp_path_factory.mktemp("kang_pretrain"))


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
  base = tmp_path_factory.mktemp("demo_run")
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


@pytest.fixture(scope="session")
def demo_counts(tmp_path_factory) -> Path:
  """The demo's PBMCs (exact counts, obs bulk_labels) as an .h5ad: 300 of the 700 cells, in a
  shuffled order (so input order is not the bundled file's)."""
  from genemamba_jax.data import demo  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top
  adata = demo.pbmc68k_counts()
  order = np.random.default_rng(0).permutation(adata.n_obs)[:300]
  path = tmp_path_factory.mktemp("demo_counts") / "pbmc68k_300.h5ad"
  adata[order].copy().write_h5ad(path)
  return path


@pytest.fixture(scope="session")
def demo_finetuned(tmp_path_factory, demo_run, demo_counts) -> Path:
  """A fine-tuned run (the finetune command, 4 steps on `demo_counts`' bulk_labels), once."""
  import subprocess  # pylint: disable=g-import-not-at-top
  import sys  # pylint: disable=g-import-not-at-top
  workdir = tmp_path_factory.mktemp("demo_finetuned") / "run"
  root = Path(__file__).resolve().parents[1]
  result = subprocess.run(
      [sys.executable, "-m", "genemamba_jax.finetune", "--config", "configs/finetune.py",
       "--workdir", str(workdir), f"--config.init_checkpoint={demo_run}",
       f"--config.data.input={demo_counts}", "--config.label_column=bulk_labels",
       "--config.num_steps=4", "--config.lr=1e-3", "--config.write_h5ad=false"],
      cwd=root, capture_output=True, text=True, timeout=900, check=False)
  assert result.returncode == 0, result.stderr[-3000:]
  return workdir
