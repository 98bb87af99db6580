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


@pytest.fixture
def shared_data() -> Path:
  """Path of the shared real-data folder; skips (fails on CI) when missing."""
  return _require_shared_data()


@pytest.fixture(scope="session")
def kang_pretrained(tmp_path_factory) -> Path:
  """Run directory of a small GeneMamba pretrained on the Kang PBMCs (tests/kang.py), once."""
  from tests.kang import pretrain_kang  # pylint: disable=g-import-not-at-top
  return pretrain_kang(_require_shared_data(), tmp_path_factory.mktemp("kang_pretrain"))
