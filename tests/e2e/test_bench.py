"""The train-step benchmark CLI (`python bench/train_step.py`) and the PyTorch peers.

The benchmark script is run as a subprocess, never imported: it is a user's command, not part of
the package.
"""

import importlib.util
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from genemamba_jax.model import GeneMambaConfig
from genemamba_jax.model import config as model_config
from genemamba_jax.train import objectives
from tests.conftest import fast_first, require_parity

ROOT = Path(__file__).resolve().parents[2]
TINY = ["--d-model", "32", "--seq-len", "64", "--batch", "2", "--vocab", "100"]
SUBCOMMANDS = ("train-step", "compile-time", "embed-step")


def bench(*args: str, timeout: float = 300) -> subprocess.CompletedProcess:
  """`python bench/train_step.py *args` from the repository root; wide help, no wrapping."""
  return subprocess.run([sys.executable, "bench/train_step.py", *args], cwd=ROOT,
                        capture_output=True, text=True, timeout=timeout, check=False,
                        env=dict(os.environ, COLUMNS="1000"))


@pytest.mark.slow  # a JAX process compiling a train step: ~20 s on CPU
def test_train_step_cli_ends_with_tokens_per_s():
  proc = bench("train-step", *TINY, "--layers", "1", "--steps", "2")
  assert proc.returncode == 0, proc.stderr
  last = proc.stdout.strip().splitlines()[-1]
  match = re.fullmatch(r"tokens_per_s=(\d+(?:\.\d+)?)", last)
  assert match and float(match.group(1)) > 0, proc.stdout


@pytest.mark.slow  # a JAX process compiling the train step at 2 depths: ~25 s on CPU
@pytest.mark.parametrize("remat", [[], ["--no-remat"]])
def test_compile_time_prints_a_line_per_depth(remat):
  proc = bench("compile-time", *TINY, "--mixer", "mamba1", "--layers", "1", "2", *remat)
  assert proc.returncode == 0, proc.stderr
  out = proc.stdout
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
    ["embed-step", "--warmup", "-1"],
])
@pytest.mark.slow  # ten JAX start-ups
def test_bad_arguments_are_argparse_errors(args):
  proc = bench(*args, timeout=120)
  assert proc.returncode == 2, (proc.stdout, proc.stderr)
  assert "error:" in proc.stderr and "Traceback" not in proc.stderr, proc.stderr


def _options(help_text: str) -> dict[str, str]:
  """{first long option string: its help text} of argparse's `--help` output at COLUMNS=1000,
  --help itself left out: the help follows the invocation after two spaces or, for a long
  invocation, is the next, deeper-indented line."""
  lines = help_text.splitlines()
  start = next(i for i, line in enumerate(lines) if line.startswith("options:"))
  out = {}
  for i, line in enumerate(lines[start + 1:], start + 1):
    if not line.startswith("  -"):
      continue
    invocation, _, text = line.strip().partition("  ")
    following = lines[i + 1] if i + 1 < len(lines) else ""
    if not text and following.startswith(" " * 4) and not following.lstrip().startswith("-"):
      text = following
    flag = next(word.rstrip(",") for word in invocation.split() if word.startswith("--"))
    if flag != "--help":
      out[flag] = text.strip()
  return out


@fast_first("subcommand", SUBCOMMANDS)
def test_every_option_has_help_and_the_package_values(subcommand):
  proc = bench(subcommand, "--help", timeout=60)
  assert proc.returncode == 0, proc.stderr
  options = _options(proc.stdout)
  assert {"--layers", "--d-model", "--seq-len", "--batch", "--vocab", "--backend",
          "--dtype"} <= set(options), options
  assert [flag for flag, text in options.items() if not text] == [], proc.stdout
  # The choices and defaults shown are the package's (the script imports its value lists).
  lists = {"--mixer": model_config.MIXERS, "--backend": model_config.SCAN_BACKENDS,
           "--dtype": model_config.DTYPES, "--remat-policy": model_config.REMAT_POLICIES,
           "--objective": objectives.OBJECTIVES, "--combine": model_config.COMBINES}
  for flag in set(lists) & set(options):
    choices = re.search(re.escape(flag) + r" \{([^}]*)\}", proc.stdout)
    assert choices and tuple(choices.group(1).split(",")) == lists[flag], flag
  if subcommand != "embed-step":
    for flag, value in [("--backend", repr(GeneMambaConfig.scan_backend)),
                        ("--remat", str(GeneMambaConfig.remat)),
                        ("--remat-policy", repr(GeneMambaConfig.remat_policy))]:
      assert value in options[flag], (flag, options[flag])
  else:
    assert "--combine" in options


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
