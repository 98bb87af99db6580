"""A small GeneMamba pretrained on the Kang PBMCs (real cells), for the downstream tests.

prepare medians -> prepare tokenize (<cls> first, top 128 genes) -> a 2-layer
Mamba-2 model trained with the leak-free objective for a few dozen steps.
"""

from __future__ import annotations

from pathlib import Path

from genemamba_jax import prepare
from genemamba_jax.train import loop
from genemamba_jax.train.config import default_config

MAX_LEN = 128


def pretrain_kang(data_dir: Path, out: Path, num_steps: int = 200, objective: str = "next_gene"
                  ) -> Path:
  """Returns the run directory (written once into `out`)."""
  kang = str(data_dir / "kang_pbmc_ifnb.h5ad")
  run = out / "run"
  if (run / "checkpoints").is_dir():
    return run
  assert prepare.main(["medians", "--input", kang, "--min-genes", "100",
                       "--out", str(out / "vocab")]) == 0
  assert prepare.main(["tokenize", "--input", kang, "--vocab", str(out / "vocab"), "--cls",
                       "--max-len", str(MAX_LEN), "--min-genes", "100", "--label-column",
                       "cell_type", "--batch-column", "patient", "--out", str(out / "tokens")]) == 0
  c = default_config()
  c.data.path = str(out / "tokens")
  c.data.max_len = MAX_LEN
  c.data.eval_fraction = 0.05
  c.objective = objective
  c.batch_size = 16
  c.num_steps = num_steps
  c.model.update(d_model=64, n_layers=2, d_state=16, headdim=32)
  c.optimizer.update(lr=3e-3, warmup_steps=10)
  c.log_every = 50
  c.eval_every = c.checkpoint_every = num_steps
  c.eval_batches = 2
  loop.train_and_evaluate(c, str(run))
  return run
