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
FAULTS_SEED to draw others. Tiny models and inputs: about four minutes on 2 CPU cores. The
harness (running, signalling, limiting and comparing commands): tests/e2e/fault_harness.py.
"""

from __future__ import annotations

import dataclasses
import json
import os
import signal
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest

from tests.conftest import SHARED_DATA, _require_shared_data
from tests.e2e.fault_harness import (RUNNING, Command, Reference, Run, absent, debris, fault_chain,
                                     hidden_temp_of, one_line, reference, tree)

# The demo config made tiny (as tests/e2e/test_first_hour.py's TINY), with enough steps that a
# signal lands mid-run, and log_every 2: a stop between two logged steps must not add a row.
TRAIN = ["--config", "configs/demo.py", "--config.num_steps=24", "--config.batch_size=8",
         "--config.data.max_len=64", "--config.model.d_model=32", "--config.model.headdim=16",
         "--config.model.d_state=8", "--config.log_every=2", "--config.eval_every=8",
         "--config.eval_batches=1", "--config.checkpoint_every=8"]
TIMING = ("steps_per_s", "tokens_per_s", "mfu")  # metrics.jsonl keys that measure the machine
FILE_LIMIT_TRAIN = 50_000  # bytes (see TRAIN_CMD)


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
