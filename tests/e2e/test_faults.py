"""Faults, as a class, for every long command: Ctrl-C, SIGTERM, kill -9 at any moment, a full disk.

Each long command (prepare medians / tokenize, train, finetune, embed, evaluate integration /
reconstruction / gene-pairs) runs once uninterrupted (the reference), then into a fresh output
through a chain of faults, each a process of its own on the same output:

  SIGINT     sent while it works: exit 130 and one `interrupted:` line (train: a checkpoint)
  SIGTERM    likewise: exit 143 and one `terminated (SIGTERM):` line (train: a checkpoint, exit 0)
  full disk  RLIMIT_FSIZE one byte below its largest output file (train: below a checkpoint;
             finetune: its confusion matrix), so writing that file fails with EFBIG, as a
             full disk fails with ENOSPC: exit 2 and one `error: ... no space left` line
  kill -9    at random moments (delays drawn from the command's own duration, that of its
             full-disk run), and once while it writes (a temporary file of its output appeared)

After each of the first three: no traceback and nothing half-written (no temporary file, no
partial output, no checkpoint a re-run would restore). kill -9 leaves temporaries by nature;
the last run, to completion, must go on from whatever the chain left, remove them, and produce
what the reference did: identical files (tokens, shards, manifest, metrics, predictions),
arrays (embeddings) and bit-identical parameters (train and finetune, which resume).

The moments are drawn from random.Random(FAULTS_SEED) (default 0); run with another
FAULTS_SEED to draw others. Tiny models and inputs: about four minutes on 2 CPU cores.
"""

from __future__ import annotations

import dataclasses
import errno
import json
import os
import random
import re
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest

from tests.conftest import SHARED_DATA, _require_shared_data

ROOT = Path(__file__).resolve().parents[2]
SEED = int(os.environ.get("FAULTS_SEED", "0"))
TRACEBACK = "Traceback (most recent call last)"
# The demo config made tiny (as tests/e2e/test_first_hour.py's TINY), with enough steps that a
# signal lands mid-run, and log_every 2: a stop between two logged steps must not add a row.
TRAIN = ["--config", "configs/demo.py", "--config.num_steps=24", "--config.batch_size=8",
         "--config.data.max_len=64", "--config.model.d_model=32", "--config.model.headdim=16",
         "--config.model.d_state=8", "--config.log_every=2", "--config.eval_every=8",
         "--config.eval_batches=1", "--config.checkpoint_every=8"]
TIMING = ("steps_per_s", "tokens_per_s", "mfu")  # metrics.jsonl keys that measure the machine
FILE_LIMIT_TRAIN = 50_000  # bytes (see TRAIN_CMD)

# --- running a command ---------------------------------------------------------------------------


# A full disk, portably: files may not grow past the limit, and writes beyond it fail with
# EFBIG (SIGXFSZ, which would kill the process instead, is ignored). Set in a wrapper that then
# execs the command (limits and ignored signals carry over), not in a preexec_fn: this process
# runs JAX's threads, and a fork of a threaded process may deadlock before the exec.
LIMIT_FILE_SIZE = ("import os, resource, signal, sys; limit = int(sys.argv[1]); "
                   "resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit)); "
                   "signal.signal(signal.SIGXFSZ, signal.SIG_IGN); "
                   "os.execv(sys.executable, [sys.executable, *sys.argv[2:]])")


RUNNING: list["Run"] = []  # every command started (to stop the background ones at the end)


class Run:
  """One command in a subprocess, its stdout and stderr in files (read while it runs)."""

  def __init__(self, argv: list[str], env: dict, logs: Path, fsize: int | None = None):
    logs.mkdir(parents=True, exist_ok=True)
    n = len(list(logs.glob("*.err")))
    self.argv = argv
    self.logs, self.n = logs, n
    self.out_file, self.err_file = logs / f"{n:02d}.out", logs / f"{n:02d}.err"
    command = [sys.executable, "-m", *argv]
    if fsize is not None:
      command = [sys.executable, "-c", LIMIT_FILE_SIZE, str(fsize), "-m", *argv]
    with open(self.out_file, "w") as out, open(self.err_file, "w") as err:
      # stdout and stderr are pipes under a file-size limit (it would cut the log files).
      self.process = subprocess.Popen(
          command, cwd=ROOT, env=env, stdout=subprocess.PIPE if fsize else out,
          stderr=subprocess.PIPE if fsize else err, text=True)
    self.start, self.wall_start = time.monotonic(), time.time()
    self.signals: list[str] = []
    self._captured = None
    RUNNING.append(self)

  def elapsed(self) -> float:
    return time.monotonic() - self.start

  def stderr(self) -> str:
    if self._captured is not None:
      return self._captured[1]
    return self.err_file.read_text(errors="replace")

  def stdout(self) -> str:
    if self._captured is not None:
      return self._captured[0]
    return self.out_file.read_text(errors="replace")

  def wait_for(self, ready: Callable[[], bool], timeout: float = 600) -> float | None:
    """Polls `ready` every 2 ms; the seconds since the start when it held, None if the
    command ended first."""
    deadline = time.monotonic() + timeout
    while self.process.poll() is None:
      if ready():
        return self.elapsed()
      assert time.monotonic() < deadline, f"{self}: timed out"
      time.sleep(0.002)
    return None

  def send(self, signum: int, after: float = 0.0) -> None:
    time.sleep(after)
    if self.process.poll() is None:
      self.process.send_signal(signum)
      self.signals.append(f"{signal.Signals(signum).name} at {self.elapsed():.2f} s")

  def finish(self, timeout: float = 600) -> int:
    if self.process.stdout is not None:  # piped
      self._captured = self.process.communicate(timeout=timeout)
    else:
      self.process.wait(timeout=timeout)
    with open(self.logs / "runs.txt", "a") as f:  # what took how long, when it failed
      f.write(f"{self.n:02d} {self.elapsed():6.2f} s  exit {self.process.returncode:4d}  "
              f"{', '.join(self.signals) or '-'}  {' '.join(self.argv[:2])}\n")
    return self.process.returncode

  def __str__(self) -> str:
    return (f"`{' '.join(self.argv)}` (exit {self.process.returncode}, "
            f"{', '.join(self.signals) or 'no signal'}; seed {SEED})\n"
            f"--- stderr (end) ---\n{self.stderr()[-3000:]}")


def one_line(run: Run, status: int, prefix: str, stream: str = "stderr") -> str:
  """The run ended with `status` and exactly one line starting with `prefix` (on `stream`),
  and no traceback."""
  err = run.stderr()
  # 130 after Ctrl-C, or ended by SIGINT itself, which a shell reports as 130 too (CPython
  # exits so when a KeyboardInterrupt went through an extension module's import, even one the
  # command caught; seen before signals._on_signal deferred signals out of imports).
  statuses = (130, -signal.SIGINT) if status == 130 else (status,)
  assert run.process.returncode in statuses, str(run)
  text = run.stdout() if stream == "stdout" else err
  lines = [line for line in text.splitlines() if line.startswith(prefix)]
  assert len(lines) == 1 and TRACEBACK not in err, str(run)
  return lines[0]


DEBRIS = re.compile(r"^\..*\.tmp|\.orbax-checkpoint-tmp|\.tmp$")


def debris(root: Path) -> list[str]:
  """Temporaries under `root`: atomic writes' hidden `.<name>.<pid>-<hex>.tmp*` files and
  directories, Orbax's `*.orbax-checkpoint-tmp*`, unfinished shards' `*.tmp`."""
  return sorted(str(p.relative_to(root)) for p in root.rglob("*") if DEBRIS.search(p.name))


def tree(root: Path) -> dict[str, bytes]:
  return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*"))
          if p.is_file()}


# --- a command and its chain of faults ------------------------------------------------------------


@dataclasses.dataclass
class Command:
  name: str
  argv: Callable[[Path], list[str]]  # the output path -> the command line (module first)
  busy: str  # stderr shows this once the command works (inside the CLI wrapper)
  outputs: Callable[[Path], object]  # what a finished run must have as the reference does
  clean: Callable[[Path, object], None]  # checks after a failed or interrupted run
  # It is writing its output, for a kill -9 in the act (None: its outputs are too small to
  # catch that; the random kills do).
  writing: Callable[[Path], bool] | None
  random_kills: int = 1
  # SIGINT and SIGTERM come at the busy line + a delay drawn from [0, a quarter of the time
  # the reference worked after that line], at most this many seconds: the reference may have
  # compiled (or shared the cores), the faulted runs find its compilation cache.
  signal_window: float = 0.5
  # How SIGINT and SIGTERM end it: (exit status, stream, the one line's start).
  signal_ends: tuple = ((130, "stderr", "interrupted: "), (143, "stderr", "terminated (SIGTERM): "))
  # The file-size limit, from the reference run; default: its largest output file - 1.
  fsize: Callable[[Reference], int] | None = None


@dataclasses.dataclass
class Reference:
  out: Path
  outputs: object
  busy_at: float  # start to the busy line
  work_end: float  # start to its last write (then it reports and the interpreter shuts down)
  largest: int  # bytes of its largest output file


def reference(cmd: Command, base: Path, env: dict) -> Reference:
  out = base / "reference" / cmd.name
  out.parent.mkdir(parents=True, exist_ok=True)
  run = Run(cmd.argv(out), env, base / "logs" / f"{cmd.name}-reference")
  busy_at = run.wait_for(lambda: cmd.busy in run.stderr())
  assert run.finish() == 0 and busy_at is not None, str(run)
  files = [out] if out.is_file() else [p for p in out.rglob("*") if p.is_file()]
  last_write = max(p.stat().st_mtime for p in [out, *out.rglob("*")])
  return Reference(out, cmd.outputs(out), busy_at, last_write - run.wall_start,
                   max(p.stat().st_size for p in files))


def fault_chain(cmd: Command, ref: Reference, base: Path, env: dict) -> Path:
  """SIGINT, SIGTERM, a full disk and kill -9s on one output, then a run to completion."""
  rng = random.Random(f"{SEED}:{cmd.name}")
  out = base / "faults" / cmd.name
  out.parent.mkdir(parents=True, exist_ok=True)
  logs = base / "logs" / cmd.name
  rest = ref.work_end - ref.busy_at  # how long the reference worked after its busy line

  for signum, (status, stream, prefix) in zip((signal.SIGINT, signal.SIGTERM), cmd.signal_ends):
    run = Run(cmd.argv(out), env, logs)
    assert run.wait_for(lambda: cmd.busy in run.stderr()) is not None, str(run)
    run.send(signum, after=rng.uniform(0, min(cmd.signal_window, rest / 4)))
    run.finish()
    one_line(run, status, prefix, stream)
    assert debris(out.parent) == [], str(run)
    cmd.clean(out, ref)

  limit = cmd.fsize(ref) if cmd.fsize else ref.largest - 1
  run = Run(cmd.argv(out), env, logs, fsize=limit)
  run.finish()
  line = one_line(run, 2, "error: ")
  assert "no space left" in line, str(run)
  assert debris(out.parent) == [], str(run)
  cmd.clean(out, ref)
  # How long a run takes here: that one ran to its outputs (with a warm compilation cache).
  duration = run.elapsed()

  finished = False  # a kill that came after the command had finished on its own
  delays = (["writing"] if cmd.writing else []) + [rng.uniform(0, duration)
                                                   for _ in range(cmd.random_kills)]
  for delay in delays:
    run = Run(cmd.argv(out), env, logs)
    if delay == "writing":
      run.wait_for(lambda: cmd.writing(out))
      run.send(signal.SIGKILL, after=rng.uniform(0, 0.01))
    else:
      run.wait_for(lambda: run.elapsed() >= delay)
      run.send(signal.SIGKILL)
    status = run.finish()
    assert status in (0, -signal.SIGKILL), str(run)
    finished = finished or status == 0

  if not finished or cmd.name != "finetune":  # finetune refuses a finished workdir (below)
    run = Run(cmd.argv(out), env, logs)
    assert run.finish() == 0, str(run)
  assert debris(out.parent) == []
  assert_same(cmd.outputs(out), ref.outputs)
  return out


def assert_same(got, want, where: str = "") -> None:
  """Equal nested dicts / lists of bytes, numbers, strings and arrays (arrays bit for bit)."""
  if isinstance(want, dict):
    assert sorted(got) == sorted(want), where
    for key in want:
      assert_same(got[key], want[key], f"{where}/{key}")
  elif isinstance(want, np.ndarray):
    np.testing.assert_array_equal(got, want, err_msg=where)
    assert got.dtype == want.dtype, where
  else:
    assert got == want, where


# --- what each command writes ------------------------------------------------------------------


def hidden_temp_of(path: Path) -> bool:
  """An atomic write of `path` (or into the directory `path`) is under way."""
  if path.is_dir():
    return any(p.name.startswith(".") and ".tmp" in p.name for p in path.iterdir())
  return path.parent.is_dir() and any(p.name.startswith(f".{path.stem}.") and ".tmp" in p.name
                                      for p in path.parent.iterdir())


def absent(out: Path, ref) -> None:
  del ref
  assert not out.exists(), f"a failed run left {out}: {sorted(tree(out)) if out.is_dir() else ''}"


@pytest.fixture(scope="module")
def base(tmp_path_factory) -> Path:
  return tmp_path_factory.mktemp("faults")


@pytest.fixture(scope="module")
def env(base) -> dict:
  """The demo data cached once, and JAX's compilation cache shared by every run (a tiny
  model's run is then mostly imports)."""
  cache = base / "jax_cache"
  cache.mkdir()
  return dict(os.environ, GENEMAMBA_CACHE=str(base / "demo_cache"),
              JAX_COMPILATION_CACHE_DIR=str(cache), JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
              JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="0")


@pytest.fixture(scope="module")
def inputs(base) -> dict[str, Path]:
  """Real cells: a corpus folder (Kang + 10x PBMC 10k), and 200 pbmc68k cells (labels,
  phases) with a PCA of their counts in obsm['X_pca10'] (an embedding to score); where the
  vocabulary (`vocab`) and the pretrained run (`pretrained`) go. (The whole PBMC 10k: with
  fewer cells `prepare` finishes before most drawn signal moments.)"""
  import anndata  # pylint: disable=g-import-not-at-top
  data = _require_shared_data()
  corpus = base / "corpus"
  corpus.mkdir()
  for name in ("kang_pbmc_ifnb.h5ad", "pbmc_10k_protein_v3.h5ad"):
    (corpus / name).symlink_to(data / name)
  adata = anndata.read_h5ad(data / "pbmc68k_reduced_counts.h5ad")
  adata = adata[np.random.default_rng(0).permutation(adata.n_obs)[:200]].copy()
  x = np.log1p(adata.X.toarray())
  x -= x.mean(axis=0)
  adata.obsm["X_pca10"] = (np.linalg.svd(x, full_matrices=False)[0][:, :10]).astype(np.float32)
  cells = base / "pbmc200.h5ad"
  adata.write_h5ad(cells)
  return {"corpus": corpus, "cells": cells, "vocab": base / "vocab",
          "pretrained": base / "reference" / "train"}


# --- the commands ------------------------------------------------------------------------------


def _files(names: tuple[str, ...]) -> Callable[[Path], dict]:
  return lambda out: {name: (out / name).read_bytes() for name in names}


def _leaves(tree, prefix="") -> dict:
  out = {}
  for key, value in tree.items():
    if isinstance(value, dict):
      out.update(_leaves(value, f"{prefix}{key}/"))
    else:
      out[f"{prefix}{key}"] = np.asarray(value)
  return out


def _restore_params(step_dir: Path) -> dict:
  import orbax.checkpoint as ocp  # pylint: disable=g-import-not-at-top
  with ocp.StandardCheckpointer() as checkpointer:
    return _leaves(checkpointer.restore(step_dir / "state")["params"])


def medians_cmd(inputs: dict) -> Command:
  return Command(
      "medians",
      lambda out: ["genemamba_jax.prepare", "medians", "--input", str(inputs["corpus"]),
                   "--out", str(out), "--min-genes", "10", "--cells-per-shard", "200"],
      busy="medians:", outputs=tree, clean=absent, writing=hidden_temp_of)


def tokenize_cmd(inputs: dict) -> Command:
  def clean(out: Path, ref: Reference) -> None:
    # Finished shards are kept (the re-run goes on from them); each is complete, the
    # reference's own bytes; no manifest until every shard is done.
    assert not (out / "manifest.json").exists()
    for sidecar in (out / "shards").glob("*.json") if out.is_dir() else ():
      for name in (sidecar.name, sidecar.with_suffix(".array_record").name):
        assert (out / "shards" / name).read_bytes() == ref.outputs[f"shards/{name}"], name

  return Command(
      "tokenize",
      lambda out: ["genemamba_jax.prepare", "tokenize", "--input", str(inputs["corpus"]),
                   "--vocab", str(inputs["vocab"]), "--out", str(out), "--min-genes", "10",
                   "--cls", "--max-len", "256", "--cells-per-shard", "100"],
      busy="tokenize:", outputs=tree, clean=clean, signal_window=0.15,
      writing=lambda out: any((out / "shards").glob("*.tmp")), random_kills=2,
      signal_ends=((130, "stderr", "interrupted: finished shards are kept"),
                   (143, "stderr", "terminated (SIGTERM): finished shards are kept")))


def _train_outputs(workdir: Path) -> dict:
  """Every metrics row without its timing keys, and the parameters of the last step."""
  rows = [{k: v for k, v in json.loads(line).items() if k not in TIMING}
          for line in (workdir / "metrics.jsonl").read_text().splitlines()]
  return {"rows": rows, "params": _restore_params(workdir / "checkpoints" / "24")}


def _train_clean(workdir: Path, ref) -> None:
  """Every checkpoint is finished (a step directory with its state), none half-written."""
  del ref
  steps = workdir / "checkpoints"
  for step in steps.iterdir() if steps.is_dir() else ():
    assert step.name.isdigit() and (step / "state" / "commit_success.txt").is_file(), step


TRAIN_CMD = Command(
    "train",
    lambda out: ["genemamba_jax.train", *TRAIN, "--workdir", str(out)],
    busy="loss=", outputs=_train_outputs, clean=_train_clean, signal_window=0.3,
    writing=lambda out: any((out / "checkpoints").glob("*orbax-checkpoint-tmp*")),
    # SIGINT: the summary as the `interrupted:` line (130); SIGTERM (preemption): it on stdout.
    signal_ends=((130, "stderr", "interrupted: SIGINT: saved a checkpoint at step"),
                 (0, "stdout", "SIGTERM: saved a checkpoint at step")),
    # Below a checkpoint's array data (how Orbax splits it into files varies), above every
    # other file: the first checkpoint after the start fails, an async save in Orbax's thread.
    fsize=lambda ref: FILE_LIMIT_TRAIN)


def finetune_cmd(inputs: dict) -> Command:
  def outputs(workdir: Path) -> dict:
    files = ("metrics.json", "metrics.jsonl", "predictions.csv", "task.json", "model.json",
             "confusion_matrix.png")
    return {**_files(files)(workdir),
            "params": _restore_params(next((workdir / "checkpoints").iterdir()))}

  def writing(workdir: Path) -> bool:  # an output or a train_state checkpoint being written
    return workdir.is_dir() and (hidden_temp_of(workdir) or any(
        (workdir / "train_state").glob("*orbax-checkpoint-tmp*")))

  def clean(workdir: Path, ref) -> None:  # no finished outputs; at most a checkpoint to resume
    del ref
    assert not (workdir / "metrics.json").exists()
    assert not (workdir / "checkpoints").exists() or not any((workdir / "checkpoints").iterdir())

  return Command(
      "finetune",
      lambda out: ["genemamba_jax.finetune", "--config", "configs/finetune.py", "--workdir",
                   str(out), f"--config.init_checkpoint={inputs['pretrained']}",
                   f"--config.data.input={inputs['cells']}", "--config.label_column=bulk_labels",
                   "--config.num_steps=8", "--config.batch_size=16", "--config.log_every=2",
                   "--config.eval_every=2", "--config.write_h5ad=false"],
      busy="fine-tuning", outputs=outputs, clean=clean, writing=writing, random_kills=0,
      signal_window=0.4,
      # Like train: Ctrl-C saves a checkpoint (130), SIGTERM too (exit 0); the rerun resumes.
      signal_ends=((130, "stderr", "interrupted: SIGINT: saved a checkpoint at step"),
                   (0, "stdout", "SIGTERM: saved a checkpoint at step")),
      # The confusion matrix fails, after predictions.csv is written (or a train_state save,
      # when a checkpoint is the larger file).
      fsize=lambda ref: (ref.out / "confusion_matrix.png").stat().st_size - 1)


def embed_cmd(inputs: dict) -> Command:
  def outputs(out: Path) -> dict:
    return {name: dict(np.load(out / name, allow_pickle=False))
            for name in ("cells.npz", "genes.npz")}

  def absent_both(out: Path, ref) -> None:
    del ref
    assert not (out / "cells.npz").exists() and not (out / "genes.npz").exists()

  return Command(
      "embed",
      lambda out: ["genemamba_jax.embed", "--checkpoint", str(inputs["pretrained"]), "--input",
                   str(inputs["cells"]), "--output", str(out / "cells.npz"), "--genes-output",
                   str(out / "genes.npz"), "--pooling", "both"],
      busy="tokenizing", outputs=outputs, clean=absent_both, writing=hidden_temp_of,
      signal_window=0.2)


def integration_cmd(inputs: dict) -> Command:
  return Command(
      "integration",
      lambda out: ["genemamba_jax.evaluate", "integration", "--input", str(inputs["cells"]),
                   "--embedding", "X_pca10", "--batch-column", "phase", "--label-column",
                   "bulk_labels", "--out", str(out), "--n-pcs", "10", "--no-plots"],
      busy="integration: obsm", outputs=_files(("metrics.csv", "metrics.json")),
      clean=absent, writing=None, signal_window=2.0)


def reconstruction_cmd(inputs: dict) -> Command:
  return Command(
      "reconstruction",
      lambda out: ["genemamba_jax.evaluate", "reconstruction", "--checkpoint",
                   str(inputs["pretrained"]), "--input", str(inputs["cells"]), "--out", str(out),
                   "--cells", "8"],
      busy="reconstruction: gene ranks", clean=absent, writing=hidden_temp_of, random_kills=0,
      signal_window=1.0,
      outputs=_files(("reconstruction.csv", "reconstruction.json", "reconstruction_cells.csv",
                      "reconstruction.png")))


def gene_pairs_cmd(inputs: dict) -> Command:
  return Command(
      "gene-pairs",
      lambda out: ["genemamba_jax.evaluate", "gene-pairs", "--checkpoint",
                   str(inputs["pretrained"]), "--pairs", str(SHARED_DATA / "gene2vec_pairs"),
                   "--out", str(out)],
      busy="gene-pairs: Gene2Vec", clean=absent, writing=hidden_temp_of, signal_window=1.0,
      outputs=_files(("gene_pairs.csv", "gene_pairs.json", "similarity.png")))


@pytest.fixture(scope="module")
def references(base, env, inputs):
  """{command name: Future of its Reference}, run one after the other in a background worker
  while the tests' fault chains run (two processes at a time on two cores): the vocabulary
  tokenize reads, the pretrained run (train's reference, and the checkpoint of finetune, embed
  and evaluate), then the downstream commands' references. Measured under that load, their
  durations are longer than a lone run's, which only makes the drawn moments earlier."""
  import concurrent.futures  # pylint: disable=g-import-not-at-top

  def vocab() -> Path:
    run = Run(["genemamba_jax.prepare", "medians", "--input", str(inputs["corpus"]), "--out",
               str(inputs["vocab"]), "--min-genes", "10"], env, base / "logs" / "vocab")
    assert run.finish() == 0, str(run)
    return inputs["vocab"]

  pool = concurrent.futures.ThreadPoolExecutor(1)
  futures = {"vocab": pool.submit(vocab), "train": pool.submit(reference, TRAIN_CMD, base, env)}
  for make in (finetune_cmd, embed_cmd, reconstruction_cmd, gene_pairs_cmd, integration_cmd):
    cmd = make(inputs)
    futures[cmd.name] = pool.submit(reference, cmd, base, env)
  yield futures
  pool.shutdown(wait=False, cancel_futures=True)
  for run in RUNNING:  # a test selected alone: stop the references it does not need
    run.process.kill()


def _reference(references, name: str) -> Reference:
  if name != "train":
    references["train"].result()  # the downstream ones need the pretrained run
  return references[name].result()


# --- the tests ---------------------------------------------------------------------------------


@pytest.mark.slow
def test_prepare_medians(base, env, inputs, references):
  del references  # started now: the background references run beside this test
  cmd = dataclasses.replace(medians_cmd(inputs), random_kills=2)
  ref = reference(cmd, base, env)
  assert sorted(ref.outputs) == ["digests.json", "medians.json", "vocab.json", "vocab_info.json"]
  fault_chain(cmd, ref, base, env)


@pytest.mark.slow
def test_prepare_tokenize(base, env, inputs, references):
  references["vocab"].result()
  cmd = tokenize_cmd(inputs)
  ref = reference(cmd, base, env)
  assert len(list((ref.out / "shards").glob("*.array_record"))) == 18
  fault_chain(cmd, ref, base, env)


@pytest.mark.slow
def test_prepare_tokenize_workers_die_with_a_killed_main_process(base, env, inputs, references):
  """kill -9 of `tokenize --workers 2` used to leave its worker processes running (orphans
  holding the inputs open, one finishing a shard while the re-run wrote the same one)."""
  references["vocab"].result()
  out = base / "tokenize_workers"
  argv = ["genemamba_jax.prepare", "tokenize", "--input", str(inputs["corpus"]), "--vocab",
          str(inputs["vocab"]), "--out", str(out), "--min-genes", "10", "--cells-per-shard",
          "100", "--workers", "2"]
  run = Run(argv, env, base / "logs" / "workers")
  assert run.wait_for(lambda: any((out / "shards").glob("*.json"))) is not None, str(run)
  children = _children(run.process.pid)
  assert len(children) >= 2, children  # the workers (and multiprocessing's resource tracker)
  run.send(signal.SIGKILL)
  run.finish()
  deadline = time.monotonic() + 10
  while (alive := [pid for pid in children if _running(pid)]) and time.monotonic() < deadline:
    time.sleep(0.05)
  assert alive == [], f"orphaned workers {alive} outlived the killed main process"
  run = Run(argv[:-2], env, base / "logs" / "workers")  # goes on in one process (cheaper)
  assert run.finish() == 0, str(run)
  assert debris(out) == []


def _children(pid: int) -> list[int]:
  tasks = Path(f"/proc/{pid}/task")
  if not tasks.is_dir():
    pytest.skip("needs /proc (Linux) to list a process's children")
  return [int(c) for task in tasks.iterdir()
          for c in (task / "children").read_text().split()]


def _running(pid: int) -> bool:
  try:
    state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
  except (FileNotFoundError, IndexError):
    return False
  return state != "Z"  # a zombie has ended; its parent (init) reaps it


@pytest.mark.slow
def test_train(base, env, references):
  """Resumes exactly after each fault: the same metrics rows, bit-identical final parameters."""
  ref = _reference(references, "train")
  assert [r["step"] for r in ref.outputs["rows"] if "loss" in r] == list(range(2, 25, 2))
  sizes = {str(p.relative_to(ref.out)): p.stat().st_size for p in ref.out.rglob("*")
           if p.is_file()}
  assert max(v for k, v in sizes.items() if not k.startswith("checkpoints")) < FILE_LIMIT_TRAIN
  assert ref.largest > FILE_LIMIT_TRAIN
  fault_chain(TRAIN_CMD, ref, base, env)


@pytest.mark.slow
def test_finetune(base, env, inputs, references):
  """Resumes from its train_state checkpoint after each fault (its outputs appear only when
  finished); a re-run on the finished workdir is refused in one line."""
  cmd = finetune_cmd(inputs)
  workdir = fault_chain(cmd, _reference(references, "finetune"), base, env)
  run = Run(cmd.argv(workdir), env, base / "logs" / "finetune")
  run.finish()
  assert "already holds a fine-tuned run" in one_line(run, 2, "error: ")


@pytest.mark.slow
def test_embed(base, env, inputs, references):
  """Cell and gene embeddings: two files, replaced together or not at all."""
  ref = _reference(references, "embed")
  # The full disk fails the larger file, written after the other.
  assert (ref.out / "genes.npz").stat().st_size == ref.largest
  fault_chain(embed_cmd(inputs), ref, base, env)


@pytest.mark.slow
def test_evaluate_integration(base, env, inputs, references):
  fault_chain(integration_cmd(inputs), _reference(references, "integration"), base, env)


@pytest.mark.slow
def test_evaluate_reconstruction(base, env, inputs, references):
  fault_chain(reconstruction_cmd(inputs), _reference(references, "reconstruction"), base, env)


@pytest.mark.slow
def test_evaluate_gene_pairs(base, env, inputs, references):
  fault_chain(gene_pairs_cmd(inputs), _reference(references, "gene-pairs"), base, env)


# --- the pieces, fast ----------------------------------------------------------------------------


def test_sigterm_unwinds_a_command_like_ctrl_c(tmp_path, capsys):
  """Python's default SIGTERM ends a process where it stands; under cli.guarded it raises,
  so atomic writes remove their temporaries, and the command ends in one line with 143."""
  from genemamba_jax import cli, files, signals  # pylint: disable=g-import-not-at-top
  target = tmp_path / "out.csv"

  def command():
    with files.atomic_path(target) as tmp:
      tmp.write_text("half")
      os.kill(os.getpid(), signal.SIGTERM)
      time.sleep(10)  # the handler raises in this thread before the sleep ends
    return ["never"]

  before = signal.getsignal(signal.SIGTERM)
  assert cli.guarded(command) == signals.TERMINATED == 143
  err = capsys.readouterr().err
  assert [l for l in err.splitlines() if l] == [
      "terminated (SIGTERM): nothing half-written is kept; re-run the command to do it again"]
  assert list(tmp_path.iterdir()) == []
  assert signal.getsignal(signal.SIGTERM) is before  # restored for the caller


def test_an_orbax_save_out_of_space_is_an_oserror():
  """TensorStore reports a full disk as a ValueError carrying the OS error code."""
  from genemamba_jax.train import checkpoint  # pylint: disable=g-import-not-at-top
  message = ('OUT_OF_RANGE: Error writing "params.x/0.0" in OCDBT database at local file "/r/'
             'checkpoints/8.orbax-checkpoint-tmp/state/": Failed to write 491987 bytes to file '
             "11: {} [os_error_code='{}']")
  assert checkpoint._out_of_space(ValueError(message.format("File too large", 27))) == 27
  assert checkpoint._out_of_space(ValueError(message.format("No space left on device", 28))) == 28
  assert checkpoint._out_of_space(ValueError(message.format("Permission denied", 13))) is None
  wrapped = RuntimeError("save failed")
  wrapped.__cause__ = OSError(errno.EDQUOT, "Disk quota exceeded")
  assert checkpoint._out_of_space(wrapped) == errno.EDQUOT


def _python(code: str) -> subprocess.Popen:
  return subprocess.Popen([sys.executable, "-c", code], cwd=ROOT, stdout=subprocess.PIPE,
                          stderr=subprocess.PIPE, text=True)


def _wait_for_line(process: subprocess.Popen, line: str) -> None:
  assert process.stdout.readline().strip() == line, process.communicate()


def test_ctrl_c_in_a_finalizer_still_stops_the_command():
  """Python drops an exception raised in a __del__ ("Exception ignored in"), and a Ctrl-C that
  came while a library's finalizer ran (seen: regex's Group.__del__) was lost: the command
  went on and finished. It is delivered again, outside the finalizer."""
  process = _python(
      "import sys, time\n"
      "from genemamba_jax import cli\n"
      "class Slow:\n"
      "  def __del__(self):\n"
      "    print('in __del__', flush=True)\n"
      "    time.sleep(1)\n"
      "def work():\n"
      "  Slow()\n"
      "  time.sleep(10)\n"
      "  return ['finished']\n"
      "sys.exit(cli.guarded(work))\n")
  _wait_for_line(process, "in __del__")
  process.send_signal(signal.SIGINT)
  out, err = process.communicate(timeout=60)
  assert process.returncode in (130, -signal.SIGINT), err
  assert "finished" not in out and "Exception ignored" not in err and TRACEBACK not in err, err
  assert err.strip().startswith("interrupted: "), err


def test_a_signal_while_the_interpreter_shuts_down_is_ignored():
  """The command has done its work and said so; JAX's exit handler (clearing its backends)
  still runs, and a Ctrl-C or SIGTERM then printed a traceback of it."""
  for signum in (signal.SIGINT, signal.SIGTERM):
    process = _python(
        "import atexit, sys, time\n"
        "atexit.register(time.sleep, 1)  # a slow exit handler, registered on import like JAX's\n"
        "from genemamba_jax import cli\n"
        "sys.exit(cli.guarded(lambda: ['done']))\n")
    _wait_for_line(process, "done")
    time.sleep(0.3)
    process.send_signal(signum)
    out, err = process.communicate(timeout=60)
    assert process.returncode == 0 and err == "", (signum, err)
