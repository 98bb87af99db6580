"""The train-step benchmark CLI (`python -m genemamba_jax.bench`) and the PyTorch peers."""

import importlib.util
import re
import subprocess
import sys
from pathlib import Path

import pytest

from genemamba_jax import bench
from genemamba_jax.model import GeneMambaConfig
from tests.conftest import require_parity

ROOT = Path(__file__).resolve().parents[2]
TINY = ["--d-model", "32", "--seq-len", "64", "--batch", "2", "--vocab", "100"]


def test_train_step_cli_ends_with_tokens_per_s():
  proc = subprocess.run(
      [sys.executable, "-m", "genemamba_jax.bench", "train-step", *TINY, "--layers", "1",
       "--steps", "2"], cwd=ROOT, capture_output=True, text=True, timeout=300, check=False)
  assert proc.returncode == 0, proc.stderr
  last = proc.stdout.strip().splitlines()[-1]
  match = re.fullmatch(r"tokens_per_s=(\d+(?:\.\d+)?)", last)
  assert match and float(match.group(1)) > 0, proc.stdout


@pytest.mark.parametrize("remat", [[], ["--no-remat"]])
def test_compile_time_prints_a_line_per_depth(remat, capsys):
  bench.main(["compile-time", *TINY, "--mixer", "mamba1", "--layers", "1", "2", *remat])
  out = capsys.readouterr().out
  # The header line shows the configuration timed, remat included.
  remat = "remat=False" if remat else f"remat={GeneMambaConfig.remat}"
  assert remat in out.splitlines()[0], out
  rows = re.findall(r"^\| (\d+) \| (\d+\.\d+) \|$", out, re.MULTILINE)
  assert [int(depth) for depth, _ in rows] == [1, 2]
  assert all(float(seconds) > 0 for _, seconds in rows)


@pytest.mark.parametrize("args", [
    [],  # no subcommand
    ["train-step", "--mixer", "mamba3"],
    ["train-step", "--layers", "0"],
    ["train-step", "--dtype", "float16"],
    ["train-step", "--backend", "cuda"],
    ["train-step", "--remat-policy", "save_all"],
    ["train-step", "--vocab", "4"],
    ["train-step", "--d-model", "16"],  # mamba2: d_inner 32 is not a multiple of headdim 64
    ["compile-time", "--layers"],
])
def test_bad_arguments_are_argparse_errors(args, capsys):
  with pytest.raises(SystemExit) as exit_info:
    bench.main(args)
  assert exit_info.value.code == 2
  assert "error:" in capsys.readouterr().err


def _torch_peers():
  require_parity("torch")
  spec = importlib.util.spec_from_file_location("torch_peers", ROOT / "bench" / "torch_peers.py")
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


@pytest.mark.parametrize("mixer, package, d_state", [("mamba2", "transformers", 16),
                                                      ("mamba1", "mambapy", 8)])
def test_torch_peer_runs_a_train_step(mixer, package, d_state):
  peers = _torch_peers()
  require_parity(package)
  tokens_per_s = peers.torch_tokens_per_s(mixer, d_model=32, layers=1, seq_len=64, batch=2,
                                          vocab=100, d_state=d_state, steps=1)
  assert tokens_per_s > 0
  # The layout: the layer is x + (mixer(x) + flip(mixer(flip(x)))) / 2 with one mixer.
  import torch  # pylint: disable=g-import-not-at-top
  layer = peers.BiMambaLayer(peers.make_mixer(mixer, 32, d_state))
  x = torch.randn(2, 8, 32)
  with torch.no_grad():
    want = x + (layer.mixer(x) + layer.mixer(x.flip(1)).flip(1)) / 2
    torch.testing.assert_close(layer(x), want)


def test_results_sections_are_replaced_not_duplicated(tmp_path):
  spec = importlib.util.spec_from_file_location("results", ROOT / "bench" / "results.py")
  results = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(results)
  path = tmp_path / "RESULTS.md"
  path.write_text("# Benchmark results\n\n## A\n\nold a\n\n## B\n\nb\n")
  results.write_section("## A", "## A\n\nnew a\n", path)
  results.write_section("## C", "## C\n\nc", path)
  results.write_section("## C", "## C\n\nc again", path)
  assert path.read_text() == ("# Benchmark results\n\n## A\n\nnew a\n\n## B\n\nb\n\n"
                              "## C\n\nc again\n")
  # A placeholder section goes when the real one is written.
  results.write_section("## D (H100)", "## D (H100)\n\nd", path, replaces=("## B",))
  assert path.read_text() == ("# Benchmark results\n\n## A\n\nnew a\n\n## C\n\nc again\n\n"
                              "## D (H100)\n\nd\n")
  # Re-writing a section with its own text leaves the real results page as it is.
  real = (ROOT / "bench" / "RESULTS.md").read_text()
  heading = "## Selective scan backends (CPU)"
  section = heading + real.split(heading, 1)[1].split("\n## ", 1)[0]
  copy = tmp_path / "copy.md"
  copy.write_text(real)
  results.write_section(heading, section, copy)
  assert copy.read_text() == real
