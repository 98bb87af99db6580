"""The fine-tuning loop, on pretraining's training core (train/state.py).

One jitted step (`TrainCore`): AdamW from train/optimizer.py with two
learning-rate groups (head, backbone x backbone_lr_scale; 0 freezes it),
global-norm clipping, warmup + cosine; BatchNorm statistics ride along as the
train state's "model_state"; class weights are the step's `extra` argument.
Validation macro-F1 every `eval_every` steps (default: each epoch); the best
validation step is kept and restored at the end (early stopping after
`patience` validations without a better one).

Checkpoints (Orbax, train/checkpoint.py) go to <workdir>/train_state at every
validation and on Ctrl-C / SIGTERM: the train state, the best state so far and
the early-stopping counters, in one step directory. Re-running the command
resumes from there exactly (batches are a function of the seed and the step,
dropout draws from the state's RNG): the same parameters as an uninterrupted run.
"""

from __future__ import annotations

import dataclasses
import json
import signal
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from flax import nnx
from sklearn import metrics as skm

from genemamba_jax import files, inference
from genemamba_jax import progress as progress_lib
from genemamba_jax.finetune import config as config_lib
from genemamba_jax.finetune import predict as predict_lib
from genemamba_jax.train import checkpoint as checkpoint_lib
from genemamba_jax.train import optimizer as optimizer_lib
from genemamba_jax.train import sharding
from genemamba_jax.train import state as state_lib

TRAIN_STATE = "train_state"


@dataclasses.dataclass
class Cells:
  """The tokenized cells of a run and what the loop needs of them."""
  sentences: list[np.ndarray]
  labels: np.ndarray  # [cells] int32 class index, -1 unlabelled
  split: np.ndarray  # [cells] "train" | "val" | "test" | "unlabelled"
  classes: list[str]
  pad_id: int

  def rows(self, name: str) -> np.ndarray:
    return np.flatnonzero(self.split == name)


@dataclasses.dataclass
class Plan:
  """Steps of a run, from the config and the number of training cells."""
  batch_size: int
  steps_per_epoch: int
  num_steps: int
  eval_every: int

  @classmethod
  def of(cls, c: ml_collections.ConfigDict, n_train: int) -> "Plan":
    batch_size = min(c.batch_size, n_train)
    per_epoch = max(n_train // batch_size, 1)  # the remainder is dropped (BatchNorm)
    num_steps = c.num_steps or max(c.epochs * per_epoch, c.min_steps)
    return cls(batch_size, per_epoch, num_steps, c.eval_every or per_epoch)

  def batch_rows(self, train_rows: np.ndarray, seed: int, step: int) -> np.ndarray:
    """The training rows of `step` (0-based): a function of (seed, step) only, so a resumed
    run draws the batches an uninterrupted one does."""
    epoch, i = divmod(step, self.steps_per_epoch)
    order = np.random.default_rng([seed, epoch]).permutation(train_rows)
    return order[i * self.batch_size:(i + 1) * self.batch_size]


def class_weights(train_labels: np.ndarray, num_classes: int, mode: str) -> np.ndarray:
  """[classes] float32 loss weights: ones, or n / (classes * n_class) ("balanced", 0 for absent
  classes). "auto" is balanced when the largest class has AUTO_IMBALANCE x the smallest's cells."""
  counts = np.bincount(train_labels, minlength=num_classes).astype(np.float64)
  present = counts[counts > 0]
  if mode == "none" or (mode == "auto" and present.max() < config_lib.AUTO_IMBALANCE
                        * present.min()):
    return np.ones((num_classes,), np.float32)
  weights = np.where(counts > 0, len(train_labels) / (num_classes * np.maximum(counts, 1)), 0.0)
  return weights.astype(np.float32)


def classification_loss(num_classes: int, label_smoothing: float) -> Callable:
  """loss_fn(model, batch, rng, class_weights [classes]) for `TrainCore`: weighted (smoothed)
  cross-entropy of batch {"tokens", "mask" [B, L], "labels" [B]}; metrics loss, accuracy."""

  def loss_fn(model, batch, rng, weights):
    logits = model(batch["tokens"], batch["mask"], rng)
    labels = batch["labels"]
    target = optax.smooth_labels(jax.nn.one_hot(labels, num_classes), label_smoothing)
    w = weights[labels]
    loss = jnp.sum(optax.softmax_cross_entropy(logits, target) * w) / jnp.maximum(jnp.sum(w), 1e-9)
    return loss, {"loss": loss, "accuracy": jnp.mean(jnp.argmax(logits, -1) == labels)}

  return loss_fn


def optimizer_config(c: ml_collections.ConfigDict, num_steps: int) -> ml_collections.ConfigDict:
  """The finetune config as train/optimizer.py's `optimizer` section (Adam's betas)."""
  return ml_collections.ConfigDict(dict(
      lr=c.lr, warmup_steps=int(round(c.warmup_fraction * num_steps)), schedule=c.schedule,
      end_lr_fraction=c.end_lr_fraction, b1=0.9, b2=0.999, eps=1e-8,
      weight_decay=c.weight_decay, clip_norm=c.clip_norm, accumulate_steps=1))


def make_core(c, build_model: Callable[[], nnx.Module], num_classes: int, num_steps: int,
              batch_size: int) -> state_lib.TrainCore:
  """The training core of a classifier: the step, its optimizer and shardings."""
  devices = jax.devices()
  if batch_size % len(devices):  # the batch is split over the devices: use one when it cannot be
    devices = devices[:1]
  mesh = sharding.make_mesh(ml_collections.ConfigDict(dict(data=-1, fsdp=1, tensor=1)), devices)
  opt = optimizer_config(c, num_steps)
  tx = optimizer_lib.make_optimizer(opt, num_steps,
                                    {"backbone": c.backbone_lr_scale, "head": 1.0})
  return state_lib.TrainCore.create(
      build_model, tx, classification_loss(num_classes, c.label_smoothing), mesh, c.seed,
      schedule=optimizer_lib.learning_rate(opt, num_steps))


@dataclasses.dataclass
class Result:
  """What the loop gives back: the best (or last) model and how the run went."""
  model: nnx.Module  # eval mode, holding the kept state
  best_step: int  # the kept step (the last one when there is no validation split)
  steps: int  # steps run
  stopped: str | None = None  # "SIGINT" / "SIGTERM" when a signal stopped it (saved)
  early_stopped: bool = False


def _held(state: dict) -> dict:
  """The parts of a train state that make the model (copied: the step donates its input)."""
  return jax.tree.map(jnp.copy, {k: state[k] for k in ("params", "model_state") if k in state})


def _eval_model(core: state_lib.TrainCore, held: dict) -> nnx.Module:
  model = core.model(held)
  model.eval()
  return model


def validate(step_fn, core, held: dict, cells: Cells, rows: np.ndarray) -> dict:
  """{"val_accuracy", "val_macro_f1"} of the model in `held` on `rows`."""
  _, state = nnx.split(_eval_model(core, held))
  probabilities, _ = predict_lib.predict_batches(step_fn, state, [cells.sentences[i] for i in rows],
                                                 64, cells.pad_id)
  pred, true = probabilities.argmax(axis=1), cells.labels[rows]
  return {"val_accuracy": float(np.mean(pred == true)),
          "val_macro_f1": float(skm.f1_score(true, pred, labels=list(range(len(cells.classes))),
                                             average="macro", zero_division=0))}


def train(c: ml_collections.ConfigDict, core: state_lib.TrainCore, backbone_params: dict,
          cells: Cells, plan: Plan, workdir: Path) -> Result:
  """Runs (or resumes) the loop from the pretrained `backbone_params` (pure dict) and a
  freshly initialized head; checkpoints and metrics.jsonl go to `workdir`."""
  train_rows, val_rows = cells.rows("train"), cells.rows("val")
  weights = jnp.asarray(class_weights(cells.labels[train_rows], len(cells.classes),
                                      c.class_weights))
  # One padded length for every batch (one compiled shape), inference.py's bucket of the longest.
  length = inference.bucket_length(max(len(s) for s in cells.sentences), 1 << 30)
  state = core.init()
  params = {**nnx.to_pure_dict(state["params"]), "backbone": backbone_params}
  state = state_lib.place_params(state, params, core.shardings)
  best, progress = _held(state), {"best_step": 0, "best_f1": -1.0, "stale": 0}
  step_fn = predict_lib.make_predict_step(nnx.graphdef(_eval_model(core, best)))

  ckpt = checkpoint_lib.Checkpointer(workdir / TRAIN_STATE, keep=1, save_every=1 << 30,
                                     async_save=False)
  start = ckpt.latest_step() or 0
  if start:
    target = {"train": core.restore_target(), "best": _restore_target(core),
              "progress": {k: jax.ShapeDtypeStruct((), jnp.float32) for k in progress}}
    saved = ckpt.restore(start, target)
    state, best = saved["train"], saved["best"]
    progress = {k: float(v) for k, v in saved["progress"].items()}
    print(f"resumed from step {start} in {workdir}", file=sys.stderr)
  _cut_log(workdir / "metrics.jsonl", start)

  stop = {"signal": None}

  def on_signal(signum, frame):
    if stop["signal"] == signal.SIGINT and signum == signal.SIGINT:
      raise KeyboardInterrupt
    stop["signal"] = signum
    print(f"\n{signal.Signals(signum).name}: finishing this step and saving a checkpoint "
          "(Ctrl-C again to stop at once)", file=sys.stderr, flush=True)

  def save(step: int) -> None:
    progress_arrays = {k: jnp.asarray(v, jnp.float32) for k, v in progress.items()}
    ckpt.save(step, {"train": state, "best": best, "progress": progress_arrays}, force=True)

  previous = {s: signal.signal(s, on_signal) for s in (signal.SIGINT, signal.SIGTERM)}
  # A run that had stopped early (then was killed writing its outputs) does not train on.
  early = bool(c.patience) and progress["stale"] >= c.patience
  done, last = start, start if early else plan.num_steps
  batch_sharding = sharding.batch_sharding(core.mesh)
  try:
    with (open(workdir / "metrics.jsonl", "a", encoding="utf-8") as log,
          progress_lib.bar(plan.num_steps, "fine-tuning", "step", counts=False) as bar):
      bar.update(start)
      for step in range(start, last):
        rows = plan.batch_rows(train_rows, c.seed, step)
        tokens, mask = _pad([cells.sentences[i] for i in rows], length, cells.pad_id)
        batch = jax.device_put({"tokens": tokens, "mask": mask, "labels": cells.labels[rows]},
                               batch_sharding)
        state, metrics = core.step(state, batch, weights)
        done = step + 1
        record = {}
        if done % c.log_every == 0 or done == plan.num_steps:
          record = {"step": done, **{k: float(v) for k, v in jax.device_get(metrics).items()}}
          if not np.isfinite(record["loss"]):
            raise FloatingPointError(f"the loss is {record['loss']} at step {done}")
        if len(val_rows) and (done % plan.eval_every == 0 or done == plan.num_steps):
          record = {"step": done, **record, **validate(step_fn, core, state, cells, val_rows)}
          if record["val_macro_f1"] > progress["best_f1"]:
            best = _held(state)
            progress.update(best_step=done, best_f1=record["val_macro_f1"], stale=0)
          else:
            progress["stale"] += 1
          early = bool(c.patience) and progress["stale"] >= c.patience
        if record:
          log.write(json.dumps(record) + "\n")
          log.flush()
          if "loss" in record:
            bar.set_postfix(loss=f"{record['loss']:.3f}", refresh=False)
        bar.update(1)
        if done % plan.eval_every == 0 or done == plan.num_steps or early or stop["signal"]:
          save(done)
        if stop["signal"] or early:
          break
  finally:
    ckpt.close()
    for signum, handler in previous.items():
      signal.signal(signum, handler)
  if not len(val_rows) or not c.keep_best:  # the last step (nothing to choose by, or asked)
    best, progress["best_step"] = _held(state), done
  stopped = signal.Signals(stop["signal"]).name if stop["signal"] else None
  return Result(_eval_model(core, best), int(progress["best_step"]), done, stopped, early)


def _restore_target(core: state_lib.TrainCore) -> dict:
  target = core.restore_target()
  return {k: target[k] for k in ("params", "model_state") if k in target}


def _pad(rows: Sequence[np.ndarray], length: int, pad_id: int) -> tuple[np.ndarray, np.ndarray]:
  """[B, length] int32 tokens and bool mask; rows longer than `length` never occur."""
  tokens = np.full((len(rows), length), pad_id, np.int32)
  for i, row in enumerate(rows):
    tokens[i, :len(row)] = row
  return tokens, tokens != pad_id


def _cut_log(path: Path, step: int) -> None:
  """metrics.jsonl without what an interrupted run logged after `step` (and no torn line)."""
  if not path.exists():
    return
  kept = []
  for line in path.read_text(encoding="utf-8").splitlines():
    try:
      row = json.loads(line)
    except json.JSONDecodeError:
      continue
    if isinstance(row, dict) and row.get("step", 0) <= step:
      kept.append(line + "\n")
  with files.atomic_path(path) as tmp:
    Path(tmp).write_text("".join(kept), encoding="utf-8")
