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
