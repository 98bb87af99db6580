"""A real full disk: ENOSPC from a small tmpfs, not the file-size limit of test_faults.py.

The output folder is a tmpfs of a few hundred KiB, mounted for one command in a private mount
namespace (`unshare -m`, or `unshare -rm` as a user with user namespaces), so the disk really
fills up while the command writes. The command must end with one `error: ... no space left` line
and exit status 2, leave no temporary file behind, and leave nothing that a re-run on a disk
with room would trip over (what it left is listed before the namespace, and the tmpfs, go away).
"""

from __future__ import annotations

import functools
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from genemamba_jax import prepare
from tests.e2e.fault_harness import DEBRIS

ROOT = Path(__file__).resolve().parents[2]
TINY = ["--config.num_steps=4", "--config.batch_size=8", "--config.data.max_len=64",
        "--config.model.d_model=32", "--config.model.headdim=16", "--config.model.d_state=8",
        "--config.log_every=1", "--config.eval_every=2", "--config.eval_batches=1",
        "--config.checkpoint_every=2"]
# Mounts the tmpfs ($1 KiB at $2), runs the command, then lists what is left on the disk.
SCRIPT = """kib=$1; disk=$2; shift 2
mount -t tmpfs -o size=${kib}k tmpfs "$disk" || exit 99
"$@"; status=$?
echo "@@left"; (cd "$disk" && find . -mindepth 1 | sort)
exit $status"""
pytestmark = pytest.mark.slow  # each test runs a command twice (on a normal and a full disk)


@functools.cache
def _mount_namespace() -> list[str] | None:
  """The prefix that gives a command its own mount namespace, or None where none can be had
  (probed once)."""
  flags = "-m" if os.geteuid() == 0 else "-rm"  # a user: map to root in a user namespace
  if shutil.which("unshare") is None or subprocess.run(
      ["unshare", flags, "sh", "-c", "mount -t tmpfs tmpfs /mnt"], capture_output=True,
      check=False).returncode != 0:
    return None
  return ["unshare", flags]


def _unshare() -> list[str]:
  """`_mount_namespace()`; skips the test where there is none."""
  if _mount_namespace() is None:
    pytest.skip("a real full disk needs a private mount namespace (`unshare -m` as root, or "
                "`unshare -rm` with user namespaces enabled); the full-disk cases of "
                "test_faults.py (a file-size limit) still run")
  return _mount_namespace()


def on_full_disk(tmp_path: Path, kib: int, module: str, *args) -> tuple[int, str, list[str]]:
  """Runs `python -m module args` (where DISK in args is the tmpfs) with a `kib` KiB disk:
  (exit status, stderr, the paths left on the disk)."""
  disk = tmp_path / "disk"
  disk.mkdir(exist_ok=True)
  argv = [str(a).replace("DISK", str(disk)) for a in args]
  result = subprocess.run(
      [*_unshare(), "bash", "-c", SCRIPT, "_", str(kib), str(disk), sys.executable, "-m", module,
       *argv], cwd=ROOT, capture_output=True, text=True, timeout=600, check=False,
      env=dict(os.environ, GENEMAMBA_CACHE=str(tmp_path / "cache")))
  assert result.returncode != 99, result.stderr  # the mount itself failed
  left = result.stdout.split("@@left\n")[1].split()
  return result.returncode, result.stderr, [p.removeprefix("./") for p in left]


def assert_full_disk_error(status: int, stderr: str, left: list[str]) -> None:
  errors = [line for line in stderr.splitlines() if line.startswith("error: ")]
  assert status == 2 and len(errors) == 1 and "no space left" in errors[0], stderr[-3000:]
  assert "Traceback" not in stderr, stderr[-3000:]
  assert [p for p in left if DEBRIS.search(Path(p).name)] == [], left


def size_kib(path: Path) -> int:
  return sum(p.stat().st_size for p in path.rglob("*") if p.is_file()) // 1024


def test_train_on_a_full_disk_stops_in_one_line_and_a_rerun_with_room_finishes(tmp_path):
  _unshare()
  reference = tmp_path / "reference"
  result = subprocess.run([sys.executable, "-m", "genemamba_jax.train", "--config",
                           "configs/demo.py", "--workdir", str(reference), *TINY], cwd=ROOT,
                          capture_output=True, text=True, timeout=600, check=False,
                          env=dict(os.environ, GENEMAMBA_CACHE=str(tmp_path / "cache")))
  assert result.returncode == 0, result.stderr[-3000:]
  # Room for the run files and about half its checkpoints: the disk fills while one is saved.
  kib = size_kib(reference) - size_kib(reference / "checkpoints") // 2
  status, stderr, left = on_full_disk(tmp_path, kib, "genemamba_jax.train", "--config",
                                      "configs/demo.py", "--workdir", "DISK/run", *TINY)
  assert_full_disk_error(status, stderr, left)
  # What is left is a run to resume: only finished checkpoints (each with Orbax's marker).
  steps = {p.split("/")[2] for p in left if p.startswith("run/checkpoints/") and p.count("/") > 2}
  for step in steps:
    assert f"run/checkpoints/{step}/_CHECKPOINT_METADATA" in left, left


def test_tokenize_on_a_full_disk_stops_in_one_line_leaving_no_partial_shard(tmp_path):
  _unshare()
  demo = prepare.main(["demo", "--out", str(tmp_path / "demo")])
  assert demo == 0
  args = ["tokenize", "--input", tmp_path / "demo" / "pbmc68k_counts.h5ad", "--vocab",
          tmp_path / "demo" / "vocab", "--cls", "--cells-per-shard", "100"]
  assert prepare.main([*map(str, args), "--out", str(tmp_path / "reference")]) == 0
  kib = size_kib(tmp_path / "reference") // 2
  status, stderr, left = on_full_disk(tmp_path, kib, "genemamba_jax.prepare", *args,
                                      "--out", "DISK/tokens")
  assert_full_disk_error(status, stderr, left)
  assert "tokens/manifest.json" not in left  # no manifest: the corpus is not complete
  # The shards that were finished are whole: the reference's own bytes would be kept.
  finished = [p for p in left if p.endswith(".array_record")]
  assert len(finished) < len(list((tmp_path / "reference" / "shards").glob("*.array_record")))


def test_embed_on_a_full_disk_stops_in_one_line_and_writes_nothing(tmp_path, demo_run,
                                                                   demo_counts):
  _unshare()
  status, stderr, left = on_full_disk(tmp_path, 64, "genemamba_jax.embed", "--checkpoint",
                                      demo_run, "--input", demo_counts, "--output",
                                      "DISK/cells.h5ad")
  assert_full_disk_error(status, stderr, left)
  assert left == []
