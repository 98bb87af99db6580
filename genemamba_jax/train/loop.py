"""train_and_evaluate: one linear pretraining run, in named sections.

mesh -> data -> model -> optimizer -> shard -> checkpoint (resume) -> steps ->
loop (log, eval, checkpoint, preemption) -> final checkpoint. Re-running the same
command on the same workdir resumes from the latest checkpoint exactly: the
parameters, optimizer state, step, RNG and the data iterator are restored.
"""

from __future__ import annotations

import json
import math
import os
import signal
import sys
import warnings

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from genemamba_jax import rundir
from genemamba_jax.data import corpora, genes
from genemamba_jax.data.pipeline import PipelineConfig, make_dataset
from genemamba_jax.data.vocab import Vocab
from genemamba_jax.errors import DataError
from genemamba_jax.train import checkpoint as checkpoint_lib
from genemamba_jax.train import coexpression as coexpression_lib
from genemamba_jax.train import distributed
from genemamba_jax.train import config as config_lib
from genemamba_jax.train import metric_writer
from genemamba_jax.train import objectives, sharding
from genemamba_jax.train import pathway as pathway_lib
from genemamba_jax.train import resume
from genemamba_jax.train import state as state_lib
from genemamba_jax.train import step as step_lib
from genemamba_jax.train import warm_start


class TrainingError(RuntimeError):
  """The run cannot go on (e.g. a non-finite loss); the message names the step."""


def data_path(c: ml_collections.ConfigDict) -> str:
  """The tokenized directory (or comma-separated directories, `corpora`) to train on; DEMO_DATA
  prepares (once) and returns the demo's."""
  if c.data.path != config_lib.DEMO_DATA:
    return c.data.path
  from genemamba_jax.data import demo  # pylint: disable=g-import-not-at-top
  cache = os.environ.get("GENEMAMBA_CACHE", os.path.expanduser("~/.cache/genemamba_jax"))
  prepare = lambda: str(demo.prepare_demo(os.path.join(cache, "demo_data"))["tokens"])
  if jax.process_index() == 0:  # the others wait, then find it prepared (a shared cache)
    path = prepare()
    distributed.sync("genemamba demo data")
    return path
  distributed.sync("genemamba demo data")
  return prepare()


def _pipeline(path: str, c, split: str, per_process: int) -> PipelineConfig:
  return PipelineConfig(batch_size=per_process, seq_len=c.data.max_len, seed=c.seed,
                        eval_fraction=c.data.eval_fraction, split=split,
                        worker_count=c.data.worker_count if split == "train" else 0)


def _auxiliary_losses(c, vocab: dict, vocab_size: int) -> tuple:
  """The pathway and co-expression losses the config turns on."""
  losses = []
  if c.pathway.gmt:
    gene_map = genes.load_gene_map(c.pathway.gene_map) if c.pathway.gene_map else None
    membership, _ = pathway_lib.load_gene_sets(list(c.pathway.gmt), vocab, gene_map)
    losses.append(pathway_lib.PathwayLoss(
        jnp.asarray(membership), gamma=c.pathway.gamma, tau=c.pathway.tau,
        genes_per_cell=c.pathway.genes_per_cell))
  if c.coexpression.pairs:
    co = c.coexpression
    gene_map = genes.load_gene_map(co.gene_map) if co.gene_map else None
    positive, negative = coexpression_lib.load_gene_pairs(co.pairs, vocab, gene_map,
                                                          split=co.split)
    losses.append(coexpression_lib.CoexpressionLoss.from_pairs(
        positive, negative, vocab_size, gamma=co.gamma, tau=co.tau,
        genes_per_cell=co.genes_per_cell))
  return tuple(losses)


def train_and_evaluate(c: ml_collections.ConfigDict, workdir: str) -> dict:
  """Pretrains as `c` says, writing checkpoints and metrics to `workdir`; returns the last metrics.

  Everything is checked before anything is written: a bad config, missing data
  or a workdir holding a run with other settings leave the workdir as it was.
  The result also says how the run ended: "finished" (it had already reached
  num_steps), "paused" (steps_per_run) or "stopped" (a signal name). Several
  processes (train/distributed.py) stop together at one step; a collective that
  fails because another process died raises `distributed.PeerLost`.
  """
  distributed.initialize(c.mesh)  # before any other JAX call
  config_lib.check(c)
  progress = {"step": 0}
  try:
    result = _train(c, workdir, progress)
  except (jax.errors.JaxRuntimeError, ValueError) as e:
    if jax.process_count() == 1 or not distributed.is_collective_failure(e):
      raise
    raise distributed.lost_peer(e, progress["step"], resume.latest_step(workdir)) from None
  distributed.finish()
  return result


def _train(c: ml_collections.ConfigDict, workdir: str, progress: dict) -> dict:
  """train_and_evaluate's run; progress["step"] follows the steps done."""
  # --- config, data and model, all checked before anything is written
  path = data_path(c)
  manifest = corpora.load_manifest(path)
  streams = objectives.model_streams_for(c.objective)
  init_params = None
  if c.init_checkpoint:
    model_config, init_params = warm_start.load_init(c, manifest["vocab"], streams)
  else:
    model_config = config_lib.model_config(c, len(manifest["vocab"]), streams)
  special = manifest.get("special_ids", {})
  objective = objectives.ObjectiveConfig(
      name=c.objective, pad_id=special.get("pad", 0), mask_id=special.get("mask", 1),
      special_ids=tuple(special[k] for k in ("cls", "eos") if special.get(k) is not None),
      mlm_probability=c.mlm_probability)
  aux_losses = _auxiliary_losses(c, manifest["vocab"], model_config.vocab_size)
  config_json = c.to_json_best_effort(indent=1)
  resume.check_resumable(workdir, json.loads(config_json), model_config, manifest["vocab"])
  done_before = resume.latest_step(workdir) or 0
  if done_before >= c.num_steps:  # nothing to do: say so, write nothing
    return dict(metric_writer.last_logged(workdir), finished=done_before)

  # --- mesh and the run directory's files
  mesh = sharding.make_mesh(c.mesh)
  per_process = c.batch_size // jax.process_count()
  if jax.process_index() == 0:  # what embed / finetune need beside the checkpoints
    os.makedirs(workdir, exist_ok=True)
    resume.write_config(workdir, config_json)
    rundir.write_run_files(
        workdir, model_config,
        Vocab(manifest["vocab"], f"{corpora.split_paths(path)[0]}/manifest.json"),
        manifest["medians"], {**manifest.get("settings", {}), "max_len": c.data.max_len})
  train_it = iter(make_dataset(path, _pipeline(path, c, "train", per_process)))

  # --- the training core: the state built in its shardings, the jitted step
  core = step_lib.pretraining_core(model_config, objective, c.optimizer, c.num_steps, mesh, c.seed)
  state = core.init()

  # --- checkpoint: resume when there is one
  ckpt = checkpoint_lib.Checkpointer(os.path.join(workdir, "checkpoints"),
                                     keep=c.keep_checkpoints, save_every=c.checkpoint_every)
  start = ckpt.latest_step() or 0
  if init_params is not None and not start:
    state = state_lib.place_params(state, init_params, core.shardings)
    print(f"starting from the weights of {c.init_checkpoint}")
  if start:
    state = ckpt.restore(start, core.restore_target(), train_it)
    print(f"resumed from step {start} in {workdir}")

  # --- evaluation step, throughput
  eval_step = jax.jit(step_lib.make_eval_step(core.graphdef, objective),
                      in_shardings=(core.shardings["params"], sharding.batch_sharding(mesh),
                                    None, None))
  params_per_token = core.num_params()
  peak = metric_writer.peak_flops_per_device()

  # --- Ctrl-C (SIGINT) and preemption (SIGTERM): finish the step, save a checkpoint, stop.
  # A second Ctrl-C stops at once (the last finished checkpoint stays the one to resume from).
  # Processes vote every step (distributed.StopVote), so all stop at the same step.
  stop = {"signal": None}
  vote = distributed.StopVote()

  def on_signal(signum, frame):
    if stop["signal"] == signal.SIGINT and signum == signal.SIGINT:
      raise KeyboardInterrupt
    stop["signal"] = signum
    if jax.process_index() == 0:
      print(f"\n{signal.Signals(signum).name}: finishing this step and saving a checkpoint "
            "(Ctrl-C again to stop at once)", file=sys.stderr, flush=True)

  previous = {s: signal.signal(s, on_signal) for s in (signal.SIGINT, signal.SIGTERM)}

  writer = metric_writer.MetricsWriter(workdir, c.num_steps, start)
  pending, last, done, agreed = [], {}, start, 0
  lost = False
  try:
    for step in range(start, c.num_steps):
      if c.profile_steps and step == c.profile_steps[0]:
        jax.profiler.start_trace(os.path.join(workdir, "profile"))
      batch = sharding.shard_batch(next(train_it), mesh)
      state, metrics = core.step(state, batch, aux_losses)
      pending.append((step + 1, metrics))
      if c.profile_steps and step == c.profile_steps[1]:
        jax.profiler.stop_trace()
      done = progress["step"] = step + 1
      agreed = vote.vote(stop["signal"] or 0)
      if done % c.log_every == 0 or done == c.num_steps:
        last = _log(pending, writer, params_per_token, peak)
        pending = []
      elif agreed:  # the loss for the summary line, but no row: a resumed run then logs
        last = _log(pending, None, params_per_token, peak)  # the rows an unstopped one does
      if done % c.eval_every == 0 or done == c.num_steps:
        last["eval_loss"] = evaluate(eval_step, state["params"], path, c, per_process, mesh,
                                     aux_losses)
        writer.write(done, {"eval_loss": last["eval_loss"]})
      pause = c.steps_per_run and done - start >= c.steps_per_run
      ckpt.save(done, state, train_it, force=done == c.num_steps or bool(agreed) or pause)
      if pause:
        last["paused"] = done
        break
      if agreed:
        last["stopped"] = signal.Signals(agreed).name
        break
  except (jax.errors.JaxRuntimeError, ValueError) as e:
    # a dead peer: waiting for the checkpoint would hang
    lost = jax.process_count() > 1 and distributed.is_collective_failure(e)
    raise
  finally:
    try:
      # Still under the handlers above: a signal during the last (async) save lets it finish.
      if not lost:
        ckpt.wait()
        ckpt.close()
    finally:
      for signum, handler in previous.items():
        signal.signal(signum, handler)
      writer.close()
      if hasattr(train_it, "close"):
        train_it.close()
  last["step"] = done
  return last


def summary_lines(result: dict, workdir: str) -> list[str]:
  """What `python -m genemamba_jax.train` prints at the end of a run (see train_and_evaluate)."""
  losses = ", ".join(f"{name} {result[key]:.4f}" for key, name in
                     (("loss", "loss"), ("eval_loss", "eval loss"))
                     if isinstance(result.get(key), float) and math.isfinite(result[key]))
  losses = f" ({losses})" if losses else ""
  if "finished" in result:
    return [f"already finished: step {result['finished']} in {workdir}{losses}; nothing to do "
            "(raise --config.num_steps to train on)"]
  if "stopped" in result:
    head = (f"{result['stopped']}: saved a checkpoint at step {result['step']}{losses}; re-run "
            "the same command to resume")
  elif "paused" in result:
    head = (f"paused after steps_per_run at step {result['paused']}{losses}; re-run the same "
            "command to go on")
  else:
    head = f"done: step {result['step']}{losses}"
  return [head,
          f"checkpoints: {workdir}/checkpoints   metrics: {workdir}/metrics.jsonl",
          f"TensorBoard: pip install tensorboard, then tensorboard --logdir {workdir}/tensorboard",
          "next: embed, finetune or evaluate with --checkpoint " + workdir + "; re-run with a "
          "larger --config.num_steps to train on"]


def _log(pending: list, writer: metric_writer.MetricsWriter | None, params: int, peak) -> dict:
  """Fetches the metrics of the steps since the last log; stops on a non-finite loss.

  Writes the latest step's row (and moves the bar) unless `writer` is None.
  """
  fetched = [(s, jax.device_get(m)) for s, m in pending]
  for s, m in fetched:
    if not np.isfinite(m["loss"]):
      raise TrainingError(f"the loss is {float(m['loss'])} at step {s}; lower optimizer.lr or "
                          "check the data (the last checkpoint is before it)")
  step, latest = fetched[-1]
  tokens = float(sum(m["tokens"] for _, m in fetched))
  scalars = {k: float(v) for k, v in latest.items() if k != "tokens"}
  if writer is None:
    return scalars
  scalars.update(writer.rates(step, tokens))
  if peak is not None:  # 6 N FLOPs per token (forward + backward), per device
    scalars["mfu"] = 6 * params * scalars["tokens_per_s"] / (peak * jax.device_count())
  writer.write(step, scalars)
  writer.progress(loss=scalars["loss"], tok_s=scalars["tokens_per_s"])
  return scalars


def evaluate(eval_step, params, path: str, c, per_process: int, mesh, aux_losses=()) -> float:
  """Mean loss over the first `c.eval_batches` batches of the held-out split."""
  if not c.data.eval_fraction:
    warnings.warn("data.eval_fraction is 0: no held-out split, no eval loss")
    return float("nan")
  config = _pipeline(path, c, "eval", per_process)
  # Whole batches only (one compiled shape), and equal shards: every process runs the same
  # number of eval steps (each one a collective).
  config.shuffle, config.num_epochs, config.drop_remainder = False, 1, True
  losses = []
  rng = jax.random.key(c.seed + 1)
  try:
    batches = make_dataset(path, config)
  except DataError:  # fewer held-out cells per process than a batch
    warnings.warn(f"fewer held-out cells than batch_size={c.batch_size}: no eval loss")
    return float("nan")
  for i, batch in enumerate(batches):
    if i == c.eval_batches:
      break
    metrics = eval_step(params, sharding.shard_batch(batch, mesh), jax.random.fold_in(rng, i),
                        aux_losses)
    losses.append(float(metrics["loss"]))
  return float(np.mean(losses)) if losses else float("nan")
