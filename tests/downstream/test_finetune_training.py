"""Fine-tuning's training: the defaults, early stopping, learning-rate groups, class weights,
the `original` preset, resuming, bad config values (Kang cells, a model pretrained in the tests)."""

import json
import os
import signal
import subprocess
import sys
import time

import anndata
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pandas as pd
import pytest
from flax import nnx
from sklearn import metrics as skm

from genemamba_jax import cli, rundir
from genemamba_jax.finetune import __main__ as finetune_cli
from genemamba_jax.finetune import config as config_lib
from genemamba_jax.finetune import run, trainer
from genemamba_jax.finetune.head import ClassifierHead
from genemamba_jax.train import sharding
from genemamba_jax.train import state as state_lib
from tests.conftest import SHARED_DATA

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


@pytest.fixture(scope="module")
def kang_small(tmp_path_factory, kang_pretrained):
  """240 Kang cells (all 5 types), the top 64 genes per cell: fast to fine-tune on CPU."""
  adata = anndata.read_h5ad(SHARED_DATA / "kang_pbmc_ifnb.h5ad")
  order = np.random.default_rng(0).permutation(adata.n_obs)[:240]
  path = tmp_path_factory.mktemp("kang_small") / "kang_small.h5ad"
  adata[np.sort(order)].copy().write_h5ad(path)
  return path


def _config(checkpoint, data, **changes):
  c = config_lib.default_config()
  c.init_checkpoint, c.data.input, c.data.max_len = str(checkpoint), str(data), 64
  c.write_h5ad = False
  c.log_every = 5
  for key, value in changes.items():
    c[key] = value
  return c


def _log(workdir):
  return [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.slow
def test_the_default_config_fits_its_training_set(kang_pretrained, kang_small, tmp_path):
  c = _config(kang_pretrained, kang_small, patience=0)
  assert c.min_steps == 400 and c.epochs == 10  # 192 training cells: min_steps decides
  metrics = run.finetune(c, tmp_path / "out")
  assert metrics["train"]["accuracy"] >= 0.95, metrics
  task = json.loads((tmp_path / "out" / "task.json").read_text())
  assert task["num_steps"] == 400
  rows = [r for r in _log(tmp_path / "out") if "lr" in r]
  lrs = {r["step"]: r["lr"] for r in rows}  # warmup 40 steps, then cosine to 0
  assert lrs[5] == pytest.approx(c.lr * 4 / 40, rel=1e-5)
  assert max(lrs.values()) <= c.lr and lrs[400] < c.lr * 1e-3


@pytest.mark.slow
def test_early_stopping_keeps_the_best_validation_step(kang_pretrained, kang_small, tmp_path):
  c = _config(kang_pretrained, kang_small, num_steps=24, eval_every=2, patience=3,
              val_fraction=0.3, lr=3e-2)
  metrics = run.finetune(c, tmp_path / "out")
  rows = [r for r in _log(tmp_path / "out") if "val_macro_f1" in r]
  f1 = [r["val_macro_f1"] for r in rows]
  best = rows[int(np.argmax(f1))]["step"]
  task = json.loads((tmp_path / "out" / "task.json").read_text())
  assert task["best_step"] == best
  if task["early_stopped"]:  # three validations without a better one, then stop
    assert rows[-1]["step"] == best + 3 * 2 and task["num_steps"] == rows[-1]["step"]
  assert rundir.finished_steps(tmp_path / "out" / "checkpoints") == [best]
  # The saved predictions are the best step's: its validation macro-F1 again.
  pred = pd.read_csv(tmp_path / "out" / "predictions.csv")
  val = pred[pred.split == "val"]
  assert skm.f1_score(val.true, val.pred, average="macro") == pytest.approx(max(f1), abs=1e-9)
  assert metrics["val"]["macro_f1"] == pytest.approx(max(f1), abs=1e-9)
  assert not (tmp_path / "out" / trainer.TRAIN_STATE).exists()


@pytest.mark.slow
def test_a_backbone_lr_of_zero_leaves_the_backbone_bit_identical(kang_pretrained, kang_small,
                                                                 tmp_path):
  run.finetune(_config(kang_pretrained, kang_small, num_steps=4, backbone_lr_scale=0.0,
                       val_fraction=0.0), tmp_path / "frozen")
  before = rundir.restore_params(rundir.resolve_checkpoint(kang_pretrained).step_dir)
  after = rundir.restore_params(rundir.resolve_checkpoint(tmp_path / "frozen").step_dir)
  flat_before = dict(jax.tree_util.tree_flatten_with_path(before)[0])
  flat_after = dict(jax.tree_util.tree_flatten_with_path(after["backbone"])[0])
  assert flat_after.keys() == flat_before.keys()
  for key, value in flat_after.items():
    np.testing.assert_array_equal(value, flat_before[key], err_msg=str(key))
  # ... while the head moved, and with the default scale the backbone moves too.
  run.finetune(_config(kang_pretrained, kang_small, num_steps=4, val_fraction=0.0),
               tmp_path / "tuned")
  tuned = rundir.restore_params(rundir.resolve_checkpoint(tmp_path / "tuned").step_dir)
  moved = [not np.array_equal(v, flat_before[k]) for k, v in
           jax.tree_util.tree_flatten_with_path(tuned["backbone"])[0]]
  assert any(moved)


def test_class_weights_balance_unbalanced_classes_only():
  balanced = np.array([0] * 10 + [1] * 8 + [2] * 6)
  assert np.array_equal(trainer.class_weights(balanced, 3, "auto"), np.ones(3, np.float32))
  skewed = np.array([0] * 90 + [1] * 10)
  w = trainer.class_weights(skewed, 3, "auto")  # class 2 absent: weight 0
  np.testing.assert_allclose(w, [100 / (3 * 90), 100 / (3 * 10), 0.0], rtol=1e-6)
  np.testing.assert_allclose(trainer.class_weights(balanced, 3, "balanced"),
                             [24 / 30, 24 / 24, 24 / 18], rtol=1e-6)
  assert np.array_equal(trainer.class_weights(skewed, 3, "none"), np.ones(3, np.float32))


def test_the_loss_weights_each_cell_by_its_class():
  class Fixed(nnx.Module):
    def __call__(self, tokens, mask, rng=None):
      return jnp.asarray([[2.0, 0.0], [0.0, 1.0], [1.0, 1.0]])

  labels = jnp.asarray([0, 1, 1])
  batch = {"tokens": jnp.zeros((3, 4), jnp.int32), "mask": jnp.ones((3, 4), bool),
           "labels": labels}
  weights = jnp.asarray([3.0, 0.5])
  loss, metrics = trainer.classification_loss(2, 0.0)(Fixed(), batch, None, weights)
  logits = np.asarray(Fixed()(None, None))
  ce = -np.log(np.exp(logits[np.arange(3), labels]) / np.exp(logits).sum(1))
  w = np.asarray([3.0, 0.5, 0.5])
  assert float(loss) == pytest.approx(float(np.sum(ce * w) / np.sum(w)), rel=1e-6)
  assert float(metrics["accuracy"]) == pytest.approx(2 / 3)


def test_the_mlp_head_trains_on_the_core_and_updates_its_batchnorm_statistics():
  """The original's head (BatchNorm) through TrainCore's jitted step: its running statistics
  are the train state's model_state, updated by each step (0.1 x the batch's, from 0 and 1)."""
  class Probe(nnx.Module):
    def __init__(self):
      self.head = ClassifierHead(8, 3, (16,), dropout=0.0, rngs=nnx.Rngs(0))

    def __call__(self, tokens, mask, rng=None):
      return self.head(tokens.astype(jnp.float32), rng)

  mesh = sharding.make_mesh(ml_collections.ConfigDict(dict(data=-1, fsdp=1, tensor=1)),
                            jax.devices()[:1])
  core = state_lib.TrainCore.create(Probe, optax.adam(1e-3), trainer.classification_loss(3, 0.0),
                                    mesh, 0)
  tokens = np.random.default_rng(0).integers(0, 5, (6, 8)).astype(np.int32)
  batch = {"tokens": tokens, "mask": np.ones((6, 8), bool), "labels": np.arange(6) % 3}
  state = core.init()
  first_linear = np.asarray(state["params"]["head"]["blocks"][0]["linear"]["kernel"][...])
  state, metrics = core.step(state, jax.device_put(batch), jnp.ones(3))
  assert np.isfinite(float(metrics["loss"]))
  hidden = tokens.astype(np.float32) @ first_linear  # the bias starts at 0
  stats = state["model_state"]["head"]["blocks"][0]["norm"]
  np.testing.assert_allclose(np.asarray(stats["mean"][...]), 0.1 * hidden.mean(0), rtol=1e-4,
                             atol=1e-5)
  np.testing.assert_allclose(np.asarray(stats["var"][...]), 0.9 + 0.1 * hidden.var(0),
                             rtol=1e-4)


def test_the_original_preset_is_the_original_protocol():
  c = cli.load_config_file(os.path.join(ROOT, "configs/finetune.py:original"))
  assert (c.pooling, c.head, c.head_layers, c.dropout, c.negative_slope) == ("cls", "mlp", 3,
                                                                             0.5, 0.1)
  assert (c.lr, c.backbone_lr_scale, c.schedule, c.warmup_fraction) == (1e-4, 1.0, "constant",
                                                                        0.0)
  assert (c.batch_size, c.epochs, c.min_steps, c.patience, c.keep_best) == (24, 5, 0, 0, False)
  assert (c.class_weights, c.label_smoothing, c.weight_decay) == ("none", 0.0, 0.0)
  default = cli.load_config_file(os.path.join(ROOT, "configs/finetune.py"))
  assert default.to_dict() == config_lib.default_config().to_dict()
  plan = trainer.Plan.of(c, 100)  # 5 epochs of 100 // 24 steps
  assert (plan.batch_size, plan.num_steps, plan.eval_every) == (24, 20, 4)


@pytest.mark.parametrize("flag, expected", [
    ("--config.pooling=max", "--config.pooling='max'; use one of cls, mean, cls_mean"),
    ("--config.class_weights=yes", "--config.class_weights='yes'; use one of auto, balanced"),
    ("--config.backbone_lr_scale=-1", "--config.backbone_lr_scale=-1.0 must be >= 0"),
    ("--config.warmup_fraction=1.5", "--config.warmup_fraction=1.5 must be in [0, 1)"),
    ("--config.data.tiledb_config=vfs.s3.region", "--config.data.tiledb_config "
                                                  "'vfs.s3.region': write it KEY=VALUE"),
])
def test_bad_config_values_are_one_line_errors(flag, expected, tmp_path, capsys):
  status = finetune_cli.main(["--config", os.path.join(ROOT, "configs/finetune.py"),
                              "--workdir", str(tmp_path / "w"), "--config.init_checkpoint=x",
                              "--config.data.input=x.h5ad", flag])
  err = capsys.readouterr().err.strip()
  assert status == 2 and len(err.splitlines()) == 1 and expected in err, err
  assert not (tmp_path / "w").exists()


def test_config_json_keeps_the_tiledb_setting_keys_but_not_their_values():
  c = config_lib.default_config()
  c.data.tiledb_config = "vfs.s3.region=us-west-2, vfs.s3.aws_secret_access_key=SECRET123"
  assert config_lib.tiledb_settings(c) == (("vfs.s3.region", "us-west-2"),
                                           ("vfs.s3.aws_secret_access_key", "SECRET123"))
  recorded = config_lib.recorded(c)
  assert recorded["data"]["tiledb_config"] == "vfs.s3.aws_secret_access_key,vfs.s3.region"
  assert "SECRET123" not in json.dumps(recorded)
  assert {k: v for k, v in recorded.items() if k != "data"} == {
      k: v for k, v in c.to_dict().items() if k != "data"}


def test_an_unknown_preset_is_a_one_line_error(tmp_path, capsys):
  status = finetune_cli.main(["--config", os.path.join(ROOT, "configs/finetune.py:fast"),
                              "--workdir", str(tmp_path / "w")])
  err = capsys.readouterr().err.strip()
  assert status == 2 and "preset 'fast'; use one of: default, original" in err, err


def _cli(workdir, checkpoint, data):
  return [sys.executable, "-m", "genemamba_jax.finetune", "--config", "configs/finetune.py",
          "--workdir", str(workdir), f"--config.init_checkpoint={checkpoint}",
          f"--config.data.input={data}", "--config.data.max_len=64", "--config.num_steps=40",
          "--config.eval_every=5", "--config.write_h5ad=false", "--config.log_every=1"]


@pytest.mark.slow
def test_an_interrupted_run_resumes_to_the_same_parameters(kang_pretrained, kang_small, tmp_path):
  env = dict(os.environ, PYTHONPATH=ROOT)
  reference = subprocess.run(_cli(tmp_path / "ref", kang_pretrained, kang_small), cwd=ROOT,
                             env=env, capture_output=True, text=True, check=False)
  assert reference.returncode == 0, reference.stderr[-2000:]
  argv = _cli(tmp_path / "w", kang_pretrained, kang_small)
  process = subprocess.Popen(argv, cwd=ROOT, env=env, stderr=subprocess.PIPE, text=True)
  log = tmp_path / "w" / "metrics.jsonl"
  deadline = time.time() + 300
  while time.time() < deadline and not (log.exists() and len(log.read_text().splitlines()) > 12):
    time.sleep(0.2)
  process.send_signal(signal.SIGINT)
  _, err = process.communicate(timeout=300)
  assert process.returncode == 130, err[-2000:]
  assert "re-run the same command to resume" in err.strip().splitlines()[-1]
  assert not (tmp_path / "w" / "metrics.json").exists()
  saved = rundir.finished_steps(tmp_path / "w" / trainer.TRAIN_STATE)
  assert len(saved) == 1 and 0 < saved[0] < 40
  # The unfinished run with another setting: refused in one line before anything is written.
  before = {f: f.read_bytes() for f in (tmp_path / "w").rglob("*") if f.is_file()}
  changed = subprocess.run(argv + ["--config.lr=0.002"], cwd=ROOT, env=env, capture_output=True,
                           text=True, check=False)
  assert changed.returncode == 2, changed.stderr[-2000:]
  assert changed.stderr.strip().splitlines() == [
      f"error: {tmp_path / 'w'}: holds an unfinished fine-tuning run with other settings "
      "(lr 0.01 -> 0.002); resume it with its own settings (its config.json), or choose a new "
      "--workdir"], changed.stderr
  assert {f: f.read_bytes() for f in (tmp_path / "w").rglob("*") if f.is_file()} == before
  resumed = subprocess.run(argv, cwd=ROOT, env=env, capture_output=True, text=True, check=False)
  assert resumed.returncode == 0, resumed.stderr[-2000:]
  assert f"resumed from step {saved[0]}" in resumed.stderr
  for name in ("metrics.json", "predictions.csv", "metrics.jsonl", "task.json"):
    assert (tmp_path / "w" / name).read_text() == (tmp_path / "ref" / name).read_text(), name
  a = rundir.restore_params(rundir.resolve_checkpoint(tmp_path / "w").step_dir)
  b = rundir.restore_params(rundir.resolve_checkpoint(tmp_path / "ref").step_dir)
  jax.tree.map(np.testing.assert_array_equal, a, b)
  # A finished run is not resumed again.
  again = subprocess.run(argv, cwd=ROOT, env=env, capture_output=True, text=True, check=False)
  assert again.returncode == 2 and "already holds a fine-tuned run" in again.stderr
