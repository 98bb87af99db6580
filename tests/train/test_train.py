"""Pretraining end to end on the embedded demo data: metrics, exact resume, preemption, NaN."""

import json
import os
import signal

import jax
import numpy as np
import pytest

from configs import demo as demo_config
from configs import pretrain as pretrain_config
from genemamba_jax.train import loop


@pytest.fixture(scope="module", autouse=True)
def demo_cache(tmp_path_factory):
  """The demo data, prepared once into a temporary cache."""
  cache = tmp_path_factory.mktemp("cache")
  old = os.environ.get("GENEMAMBA_CACHE")
  os.environ["GENEMAMBA_CACHE"] = str(cache)
  yield cache
  if old is None:
    del os.environ["GENEMAMBA_CACHE"]
  else:
    os.environ["GENEMAMBA_CACHE"] = old


def _config(**overrides):
  c = demo_config.get_config()
  c.num_steps = 6
  c.batch_size = 8
  c.data.max_len = 96
  c.model.d_model = 32
  c.model.n_layers = 2
  c.model.headdim = 16
  c.model.d_state = 8
  c.log_every = 1
  c.eval_every = 3
  c.eval_batches = 2
  c.checkpoint_every = 3
  for key, value in overrides.items():
    node = c
    *parents, leaf = key.split(".")
    for p in parents:
      node = node[p]
    node[leaf] = value
  return c


def _metrics(workdir):
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    return [json.loads(line) for line in f]


@pytest.fixture(scope="module")
def straight_run(tmp_path_factory):
  """Six uninterrupted steps; (workdir, last metrics)."""
  workdir = str(tmp_path_factory.mktemp("straight"))
  return workdir, loop.train_and_evaluate(_config(), workdir)


@pytest.mark.slow  # a demo training run (straight_run)
def test_demo_trains_logs_evaluates_and_checkpoints(straight_run):
  workdir, last = straight_run
  records = _metrics(workdir)
  steps = [r["step"] for r in records if "loss" in r]
  assert steps == [1, 2, 3, 4, 5, 6]
  assert all({"loss", "lr", "grad_norm", "tokens_per_s", "loss/next_gene"} <= r.keys()
             for r in records if "loss" in r)
  assert [r["step"] for r in records if "eval_loss" in r] == [3, 6]
  assert np.isfinite(last["eval_loss"]) and np.isfinite(last["loss"])
  assert os.path.exists(os.path.join(workdir, "config.json"))
  assert sorted(os.listdir(os.path.join(workdir, "checkpoints"))) >= ["3", "6"]
  assert os.listdir(os.path.join(workdir, "tensorboard"))


@pytest.mark.slow  # a demo training run (straight_run)
def test_resume_is_exact(straight_run, tmp_path):
  straight, resumed = straight_run[0], str(tmp_path / "resumed")
  loop.train_and_evaluate(_config(steps_per_run=3), resumed)  # stops at 3 with a checkpoint
  assert max(r["step"] for r in _metrics(resumed)) == 3
  loop.train_and_evaluate(_config(steps_per_run=3), resumed)  # resumes at 3, ends at 6
  a = {r["step"]: r for r in _metrics(straight) if "loss" in r}
  b = {r["step"]: r for r in _metrics(resumed) if "loss" in r}
  assert sorted(b) == [1, 2, 3, 4, 5, 6]
  for step in range(1, 7):  # the same batches, and bit-identical training
    assert a[step]["batch_checksum"] == b[step]["batch_checksum"], step
    assert a[step]["loss"] == b[step]["loss"], step
  pa = _restore_params(straight)
  pb = _restore_params(resumed)
  for x, y in zip(jax.tree.leaves(pa), jax.tree.leaves(pb)):
    np.testing.assert_array_equal(x, y)


def _restore_params(workdir):
  import orbax.checkpoint as ocp
  path = os.path.join(workdir, "checkpoints", "6", "state")
  with ocp.StandardCheckpointer() as ckptr:
    return ckptr.restore(path)["params"]


@pytest.mark.slow  # over ~10 s on 2 cores
def test_sigterm_saves_and_stops(tmp_path, monkeypatch):
  workdir = str(tmp_path / "run")
  calls = {"n": 0}
  real = loop.sharding.shard_batch

  def preempt_at_second_batch(batch, mesh):
    calls["n"] += 1
    if calls["n"] == 2:
      os.kill(os.getpid(), signal.SIGTERM)
    return real(batch, mesh)

  monkeypatch.setattr(loop.sharding, "shard_batch", preempt_at_second_batch)
  loop.train_and_evaluate(_config(checkpoint_every=100), workdir)
  assert os.listdir(os.path.join(workdir, "checkpoints")) == ["2"]


@pytest.mark.slow  # over ~10 s on 2 cores
def test_non_finite_loss_stops_naming_the_step(tmp_path):
  with pytest.raises(loop.TrainingError, match=r"at step \d"):
    loop.train_and_evaluate(_config(**{"optimizer.lr": 1e30, "optimizer.warmup_steps": 0,
                                       "optimizer.clip_norm": 1e30}), str(tmp_path / "run"))


def test_bad_configs_fail_before_compiling(tmp_path):
  with pytest.raises(ValueError, match="objective='next_token'"):
    loop.train_and_evaluate(_config(objective="next_token"), str(tmp_path / "a"))
  with pytest.raises(KeyError, match='Did you mean "d_model"'):
    _config(**{"model.d_modle": 3})
  c = pretrain_config.get_config("layers=48,d_model=768,seq_len=4096,mixer=mamba1")
  from genemamba_jax.train import config as config_lib  # pylint: disable=g-import-not-at-top
  model = config_lib.model_config(c, 100, "mixed")
  assert (model.n_layers, model.d_model, c.data.max_len, model.mixer, model.state_size) == (
      48, 768, 4096, "mamba1", 16)
  with pytest.raises(ValueError, match="unknown argument 'depth'"):
    pretrain_config.get_config("depth=3")


@pytest.mark.slow  # over ~10 s on 2 cores
def test_pathway_loss_in_training(tmp_path, shared_data):
  """The demo vocabulary is gene symbols, so Hallmark sets map onto it directly."""
  gmt = str(shared_data / "genesets" / "h.all.v7.0.symbols.gmt")
  last = loop.train_and_evaluate(
      _config(num_steps=2, eval_every=2, checkpoint_every=2,
              **{"pathway.gmt": [gmt], "objective": "mlm"}), str(tmp_path / "run"))
  records = _metrics(str(tmp_path / "run"))
  losses = [r for r in records if "loss/pathway" in r]
  assert len(losses) == 2 and all(np.isfinite(r["loss/pathway"]) for r in losses)
  assert all(abs(r["loss"] - r["loss/mlm"] - 0.1 * r["loss/pathway"]) < 1e-4 for r in losses)
  assert np.isfinite(last["eval_loss"])


def test_cli_reports_a_misspelt_key_in_one_line(tmp_path):
  import subprocess
  import sys
  root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
  result = subprocess.run(
      [sys.executable, "-m", "genemamba_jax.train", "--config", "configs/demo.py", "--workdir",
       str(tmp_path), "--config.batchsize=3"], cwd=root, capture_output=True, text=True)
  assert result.returncode == 2
  assert result.stderr.strip().splitlines() == [
      "error: --config.batchsize: unknown key batchsize; did you mean batch_size or eval_batches?"]
  assert not os.listdir(tmp_path)


def test_the_config_lists_every_model_field_and_mamba1_gets_its_own_state_size():
  from genemamba_jax.model import GeneMambaConfig  # pylint: disable=g-import-not-at-top
  from genemamba_jax.train import config as config_lib  # pylint: disable=g-import-not-at-top
  c = config_lib.default_config()
  fields = {f.name for f in __import__("dataclasses").fields(GeneMambaConfig)}
  assert set(c.model.keys()) == fields - {"streams"}  # the objective sets the streams
  with c.unlocked():
    c.model.mixer = "mamba1"
  model = config_lib.model_config(c, 100, "mixed")
  assert model.state_size == GeneMambaConfig(mixer="mamba1").state_size == 16
  with c.unlocked():
    c.model.mixer = "mamba2"
  assert config_lib.model_config(c, 100, "mixed").state_size == GeneMambaConfig().state_size == 64
