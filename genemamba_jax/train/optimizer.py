"""AdamW with warmup + cosine decay, global-norm clipping and gradient accumulation.

The recipe is the GPT-3 one that Mamba was trained with (Gu & Dao 2023, E.2):
AdamW b = (0.9, 0.95), weight decay 0.1, gradient clipping 1.0, linear warmup
then cosine decay. The peak learning rate defaults to 6e-4, GPT-3's value for
its 125M model, the size class of GeneMamba (66M).

Weight decay follows HF Trainer (no decay on biases and norm weights) plus
mamba_ssm's `_no_weight_decay` parameters (A_log, D, dt_bias); embeddings and
every other kernel are decayed, as in HF, GPT-2/3 and mamba_ssm's own training.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import jax
import ml_collections
import optax

# mamba_ssm marks these `_no_weight_decay`: decaying A_log pulls every decay
# rate towards exp(0) = 1 and D towards 0, which are not "small weights".
_SSM_NO_DECAY = frozenset({"A_log", "D", "dt_bias"})
# Norm parameters: nnx.RMSNorm `scale`; GatedRMSNorm `weight` lives in `norm`.
_NORM_LEAVES = frozenset({"scale"})
SCHEDULES = ("cosine", "constant")


def effective_warmup_steps(warmup_steps: int, num_steps: int) -> int:
  """warmup_steps, or num_steps // 10 when the run is not longer than the warmup.

  A warmup as long as the run would never reach the peak (a smoke test with
  the default 1000 warmup steps); a warmup shorter than the run is kept as given.
  """
  return warmup_steps if warmup_steps < num_steps else num_steps // 10


def make_schedule(lr: float, warmup_steps: int, num_steps: int,
                  end_lr_fraction: float = 0.0) -> optax.Schedule:
  """Learning rate per optimizer update: 0 -> lr linearly over the warmup, then
  cosine from lr to lr * end_lr_fraction at num_steps (held after that).

  The warmup is `effective_warmup_steps(warmup_steps, num_steps)`.
  """
  if lr <= 0:
    raise ValueError(f"lr={lr} must be > 0")
  if num_steps < 1 or warmup_steps < 0:
    raise ValueError(f"need num_steps >= 1 and warmup_steps >= 0, got num_steps={num_steps}, "
                     f"warmup_steps={warmup_steps}")
  if not 0.0 <= end_lr_fraction <= 1.0:
    raise ValueError(f"end_lr_fraction={end_lr_fraction} must be in [0, 1]")
  return optax.warmup_cosine_decay_schedule(
      init_value=0.0, peak_value=lr, warmup_steps=effective_warmup_steps(warmup_steps, num_steps),
      decay_steps=num_steps, end_value=lr * end_lr_fraction)


def learning_rate(cfg: ml_collections.ConfigDict, num_steps: int) -> optax.Schedule:
  """The schedule `make_optimizer(cfg, num_steps)` follows (for logging the lr).

  `cfg.schedule` (default "cosine"): "cosine" decays to `end_lr_fraction` of the
  peak after the warmup; "constant" holds the peak.
  """
  kind = cfg.get("schedule", "cosine")
  if kind not in SCHEDULES:
    raise ValueError(f"schedule={kind!r}; use one of {', '.join(SCHEDULES)}")
  end = cfg.end_lr_fraction if kind == "cosine" else 1.0
  return make_schedule(cfg.lr, int(cfg.warmup_steps), num_steps, end)


def _names(path) -> tuple[str, ...]:
  """Key names of a pytree path. Drops nnx.Variable's trailing `.value`
  (a GetAttrKey), so nnx.State and its pure-dict form give the same names."""
  out = []
  for key in path:
    if isinstance(key, jax.tree_util.DictKey):
      out.append(str(key.key))
    elif isinstance(key, jax.tree_util.SequenceKey):
      out.append(str(key.idx))
  return tuple(out)


def decays(names: tuple[str, ...]) -> bool:
  """Whether the parameter at this path (module names, then parameter name) gets weight decay."""
  leaf = names[-1]
  if leaf in _SSM_NO_DECAY:
    return False
  if leaf == "bias" or leaf.endswith("_bias"):  # every bias, dt_proj's included
    return False
  if leaf in _NORM_LEAVES or any(name.startswith("norm") for name in names[:-1]):
    return False
  return True


def weight_decay_mask(params: Any) -> Any:
  """Pytree like `params` (e.g. the nnx.State of nnx.Param) of bool: True = decay."""
  return jax.tree_util.tree_map_with_path(lambda path, _: decays(_names(path)), params)


def make_optimizer(cfg: ml_collections.ConfigDict, num_steps: int,
                   group_scales: Mapping[str, float] | None = None
                   ) -> optax.GradientTransformation:
  """clip_by_global_norm -> AdamW(warmup + schedule, masked decay), accumulated.

  Args:
    cfg: the `optimizer` section of `train.config.default_config()`.
    num_steps: optimizer updates of the run, which the schedule spans. With
      accumulate_steps = k > 1 it is wrapped in `optax.MultiSteps`: call
      `update` once per micro-batch; every k-th call applies the mean of the
      k gradients (clipped as a whole) and advances the schedule by one, so
      the run takes k * num_steps micro-batches.
    group_scales: {top-level parameter name: learning-rate multiplier}, e.g.
      fine-tuning's {"backbone": 1.0, "head": 10.0}; 0 freezes that part. Every
      top-level name of the parameters must be listed. None: one group.
  """
  schedule = learning_rate(cfg, num_steps)

  def adamw(scale: float) -> optax.GradientTransformation:
    if scale == 0:  # frozen
      return optax.set_to_zero()
    rate = schedule if scale == 1 else (lambda step: scale * schedule(step))
    return optax.adamw(rate, b1=cfg.b1, b2=cfg.b2, eps=cfg.eps, weight_decay=cfg.weight_decay,
                       mask=weight_decay_mask)

  if group_scales is None:
    update = adamw(1.0)
  else:
    group_of = lambda params: jax.tree_util.tree_map_with_path(
        lambda path, _: _names(path)[0], params)
    update = optax.multi_transform(
        {name: adamw(scale) for name, scale in group_scales.items()}, group_of)
  # Clipping inside MultiSteps sees the accumulated gradient, like PyTorch
  # clipping after the last backward of an accumulation.
  tx = (optax.chain(optax.clip_by_global_norm(cfg.clip_norm), update) if cfg.clip_norm > 0
        else update)
  k = int(cfg.accumulate_steps)
  if k < 1:
    raise ValueError(f"accumulate_steps={k} must be >= 1")
  if k == 1:
    return tx
  return optax.MultiSteps(tx, every_k_schedule=k).gradient_transformation()
