"""The training configuration: every key, its default and its checks.

Config files in `configs/` start from `default_config()` and change what they
need; the command line overrides any key (`--config.batch_size=64`). Keys under
`model` are `GeneMambaConfig` fields; `model.vocab_size = 0` takes the
tokenized corpus's vocabulary size.
"""

from __future__ import annotations

import dataclasses

import ml_collections

from genemamba_jax.data.errors import DataError
from genemamba_jax.model import GeneMambaConfig

# `data.path` of the embedded demo data (configs/demo.py): scanpy's pbmc68k_reduced, prepared once.
DEMO_DATA = "demo:pbmc68k_reduced"


def default_config() -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.seed = 0
  # A run directory (train, finetune or `convert from-pytorch`) whose weights the run starts
  # from when its workdir has no checkpoint yet; its architecture replaces model.* (see
  # train/warm_start.py). The corpus must be tokenized with its vocabulary.
  c.init_checkpoint = ""
  c.data = ml_collections.ConfigDict(dict(
      path="",  # a tokenized directory (prepare tokenize); "demo:pbmc68k_reduced": the demo's
      max_len=2048,  # L: crop / pad every cell to this many tokens
      eval_fraction=0.01,  # cells held out for the evaluation loss
      worker_count=0,  # Grain worker processes
  ))
  c.batch_size = 32  # global, over all processes and devices
  c.num_steps = 10_000
  c.steps_per_run = 0  # > 0: stop (with a checkpoint) after this many steps; re-run to go on
  c.objective = "next_gene"  # next_gene (leak-free) | next_gene_faithful | mlm
  c.mlm_probability = 0.15
  c.pathway = ml_collections.ConfigDict(dict(
      gmt=[],  # GMT files; empty = no pathway loss
      gene_map="",  # symbol -> vocabulary id table (pkl or TSV) when the vocab is not symbols
      gamma=0.1, tau=0.07, genes_per_cell=64,
  ))
  c.coexpression = ml_collections.ConfigDict(dict(  # the review copy's co-expression InfoNCE
      pairs="",  # a Gene2Vec pair folder or a *_text.txt file (labels: *_label.txt); empty = off
      split="train",  # which {split}_text.txt / {split}_label.txt of a folder
      gene_map="",  # symbol -> vocabulary id table (pkl or TSV) when the vocab is not symbols
      gamma=0.1,  # weight of the loss in the total (the review copy's)
      tau=0.1,  # temperature (the review copy's)
      genes_per_cell=64,  # genes sampled per cell; the similarity is [B * this]^2
  ))
  defaults = GeneMambaConfig()
  model = {f.name: getattr(defaults, f.name) for f in dataclasses.fields(GeneMambaConfig)}
  model["vocab_size"] = 0
  model["d_state"] = 64
  model["dt_rank"] = 0  # 0 = ceil(d_model / 16)
  model["A_init_range"] = list(defaults.A_init_range)
  del model["streams"]  # set by the objective
  c.model = ml_collections.ConfigDict(model)
  from genemamba_jax.train import optimizer  # pylint: disable=g-import-not-at-top
  c.optimizer = optimizer.default_optimizer_config()
  from genemamba_jax.train import sharding  # pylint: disable=g-import-not-at-top
  c.mesh = sharding.default_sharding_config()  # data parallel over all devices
  c.log_every = 50
  c.eval_every = 1000
  c.eval_batches = 10
  c.checkpoint_every = 1000
  c.keep_checkpoints = 3
  c.profile_steps = ()  # (first, last) step of a jax.profiler trace, e.g. (10, 15)
  c.lock()  # a misspelt key in a config file fails instead of adding a new one
  return c


def comment_sources() -> list[tuple[object, str]]:
  """Where `--help` finds each key's comment (see `genemamba_jax.cli.key_comments`)."""
  from genemamba_jax.train import optimizer, sharding  # pylint: disable=g-import-not-at-top
  return [(default_config, ""), (GeneMambaConfig, "model."),
          (optimizer.default_optimizer_config, "optimizer."),
          (sharding.default_sharding_config, "mesh.")]


def model_config(c: ml_collections.ConfigDict, vocab_size: int, streams: str) -> GeneMambaConfig:
  """The GeneMambaConfig of a training config; DataError names a bad key or value."""
  fields = dict(c.model)
  fields["vocab_size"] = fields["vocab_size"] or vocab_size
  fields["dt_rank"] = fields["dt_rank"] or None
  fields["A_init_range"] = tuple(fields["A_init_range"])
  known = {f.name for f in dataclasses.fields(GeneMambaConfig)}
  unknown = sorted(set(fields) - known)
  if unknown:
    raise DataError(f"unknown model keys: {', '.join('model.' + k for k in unknown)}")
  try:
    return GeneMambaConfig(**fields, streams=streams)
  except (ValueError, TypeError) as e:  # e.g. model.mixer='mamba3'
    raise DataError(str(e).replace("GeneMambaConfig: ", "model.")) from None


def check(c: ml_collections.ConfigDict) -> None:
  """Impossible combinations, found before anything compiles."""
  from genemamba_jax.train import objectives  # pylint: disable=g-import-not-at-top
  if c.objective not in objectives.OBJECTIVES:
    raise DataError(f"objective={c.objective!r}; use one of {', '.join(objectives.OBJECTIVES)}")
  if not c.data.path:
    raise DataError("set data.path to a tokenized directory (prepare tokenize), or to "
                     "demo:pbmc68k_reduced for the embedded demo data")
  for key in ("batch_size", "num_steps", "log_every", "eval_every", "checkpoint_every"):
    if c[key] < 1:
      raise DataError(f"{key}={c[key]} must be >= 1")
  if c.batch_size % max(1, _process_count()):
    raise DataError(f"batch_size={c.batch_size} is not divisible by the {_process_count()} processes")
  if c.pathway.gmt and not 0 < c.pathway.tau:
    raise DataError(f"pathway.tau={c.pathway.tau} must be > 0")
  if c.coexpression.pairs and not 0 < c.coexpression.tau:
    raise DataError(f"coexpression.tau={c.coexpression.tau} must be > 0")
  if c.coexpression.pairs and c.coexpression.genes_per_cell < 1:
    raise DataError(f"coexpression.genes_per_cell={c.coexpression.genes_per_cell} must be >= 1")
  if len(c.profile_steps) not in (0, 2):
    raise DataError("profile_steps is () or (first, last)")


def _process_count() -> int:
  import jax  # pylint: disable=g-import-not-at-top
  return jax.process_count()
