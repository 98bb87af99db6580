"""The training configuration: every key, its default and its checks.

Config files in `configs/` start from `default_config()` and change what they
need; the command line overrides any key (`--config.batch_size=64`). Keys under
`model` are `GeneMambaConfig` fields; `model.vocab_size = 0` takes the
tokenized corpus's vocabulary size.
"""

from __future__ import annotations

import dataclasses

import ml_collections

from genemamba_jax.errors import DataError
from genemamba_jax.model import GeneMambaConfig

# `data.path` of the embedded demo data (configs/demo.py): scanpy's pbmc68k_reduced, prepared once.
DEMO_DATA = "demo:pbmc68k_reduced"


def default_config() -> ml_collections.ConfigDict:
  """Every training key with its default (config files start from this)."""
  model = GeneMambaConfig()  # the model's defaults: the paper's model (model/config.py)
  c = ml_collections.ConfigDict()
  c.seed = 0  # parameters, data order and the objectives' random draws
  # A run directory (train, finetune or `convert from-pytorch`) whose weights the run starts
  # from when its workdir has no checkpoint yet; its architecture replaces model.* (see
  # train/warm_start.py). The corpus must be tokenized with its vocabulary.
  c.init_checkpoint = ""

  c.data = ml_collections.ConfigDict()
  # A tokenized directory (prepare tokenize), or several comma-separated (one corpus: same
  # vocabulary and settings, data/corpora.py); "demo:pbmc68k_reduced": the demo's.
  c.data.path = ""
  c.data.max_len = 2048  # L: crop / pad every cell to this many tokens
  c.data.eval_fraction = 0.01  # cells held out for the evaluation loss
  c.data.worker_count = 0  # Grain worker processes prefetching batches (0: in this process)

  c.batch_size = 32  # cells a step, global: over all processes and devices
  c.num_steps = 10_000  # optimizer updates (x accumulate_steps batches) in the whole run
  c.steps_per_run = 0  # > 0: stop (with a checkpoint) after this many steps; re-run to go on
  c.objective = "next_gene"  # next_gene (leak-free) | next_gene_faithful | mlm
  c.mlm_probability = 0.15  # mlm: share of the gene positions masked

  c.pathway = ml_collections.ConfigDict()  # the paper's gene-set InfoNCE (train/pathway.py)
  c.pathway.gmt = []  # GMT files; empty = no pathway loss
  c.pathway.gene_map = ""  # symbol -> vocabulary id table (pkl or TSV) when the vocab is not symbols
  c.pathway.gamma = 0.1  # weight of the loss in the total (the paper's)
  c.pathway.tau = 0.07  # temperature (the paper gives none; MoCo's and SupCon's)
  c.pathway.genes_per_cell = 64  # genes sampled per cell; the similarity is [B * this]^2

  c.coexpression = ml_collections.ConfigDict()  # the review copy's co-expression InfoNCE
  c.coexpression.pairs = ""  # a Gene2Vec pair folder or a *_text.txt file; empty = off
  c.coexpression.split = "train"  # which {split}_text.txt / {split}_label.txt of a folder
  c.coexpression.gene_map = ""  # symbol -> vocabulary id table when the vocab is not symbols
  c.coexpression.gamma = 0.1  # weight of the loss in the total (the review copy's)
  c.coexpression.tau = 0.1  # temperature (the review copy's)
  c.coexpression.genes_per_cell = 64  # genes sampled per cell; the similarity is [B * this]^2

  # GeneMambaConfig's fields (the streams come from the objective); defaults from there.
  c.model = ml_collections.ConfigDict()
  c.model.vocab_size = 0  # 0 = the tokenized corpus's vocabulary size
  c.model.d_model = model.d_model  # hidden size
  c.model.n_layers = model.n_layers  # BiMamba layers
  c.model.mixer = model.mixer  # mamba2 (SSD, the released weights') | mamba1 (the paper's text)
  c.model.d_state = 0  # N; 0 = the mixer's default: 16 for mamba1, 64 for mamba2 (mamba_ssm)
  c.model.d_conv = model.d_conv  # causal conv width
  c.model.expand = model.expand  # d_inner = expand * d_model
  c.model.headdim = model.headdim  # Mamba-2 head size P
  c.model.ngroups = model.ngroups  # Mamba-2 groups of B and C
  c.model.dt_rank = 0  # Mamba-1 dt projection rank; 0 = ceil(d_model / 16)
  c.model.dt_min = model.dt_min  # dt initialization range (mamba_ssm's)
  c.model.dt_max = model.dt_max  # dt initialization range (mamba_ssm's)
  c.model.dt_init_floor = model.dt_init_floor  # smallest initial dt
  c.model.A_init_range = list(model.A_init_range)  # Mamba-2 A = -uniform(range) at init
  c.model.conv_bias = model.conv_bias  # bias in the causal conv (mamba_ssm: True)
  c.model.proj_bias = model.proj_bias  # bias in in_proj / out_proj (mamba_ssm: False)
  c.model.norm_eps = model.norm_eps  # RMSNorm epsilon
  c.model.combine = model.combine  # mean | sum | concat | gate: how a layer merges the directions
  c.model.shared_combine = model.shared_combine  # one concat/gate Linear for all layers (original)
  c.model.residual = model.residual  # around | inside | identity (GeneMambaConfig.residual)
  c.model.prenorm = model.prenorm  # RMSNorm before each layer's mixer (the original has none)
  c.model.tie_embeddings = model.tie_embeddings  # LM head = embedding table (original: untied)
  c.model.lm_head_bias = model.lm_head_bias  # bias in the LM head (original: yes)
  c.model.pad_id = model.pad_id  # the padding token (<pad> = 0 in our vocabularies)
  c.model.dtype = model.dtype  # float32 | bfloat16: compute dtype; parameters stay float32
  c.model.scan_backend = model.scan_backend  # auto | chunked | numba | pallas | sequential | associative
  c.model.scan_chunk_size = model.scan_chunk_size  # time steps per chunk of the scan
  c.model.remat = model.remat  # recompute activations in the backward (GeneMambaConfig.remat)
  c.model.remat_policy = model.remat_policy  # what remat keeps (GeneMambaConfig.remat_policy)

  # AdamW with warmup + cosine decay, the GPT-3 recipe Mamba was trained with (train/optimizer.py).
  c.optimizer = ml_collections.ConfigDict()
  c.optimizer.lr = 6e-4  # peak learning rate; GPT-3 125M's (the Mamba paper's "GPT-3 spec")
  c.optimizer.warmup_steps = 1000  # linear warmup (num_steps // 10 when the run is shorter)
  c.optimizer.end_lr_fraction = 0.1  # cosine decays to this share of the peak, as GPT-3
  c.optimizer.b1 = 0.9  # Adam beta1
  c.optimizer.b2 = 0.95  # Adam beta2 (GPT-3's)
  c.optimizer.eps = 1e-8  # Adam epsilon
  c.optimizer.weight_decay = 0.1  # AdamW decay; none on biases, norms, A_log, D, dt_bias
  c.optimizer.clip_norm = 1.0  # global-norm gradient clipping; <= 0 disables it
  c.optimizer.accumulate_steps = 1  # micro-batches per optimizer update

  # The device mesh (train/sharding.py): -1 = all the devices the other axes leave.
  placeholder = ml_collections.config_dict.placeholder
  c.mesh = ml_collections.ConfigDict()
  c.mesh.data = -1  # data parallel
  c.mesh.fsdp = 1  # parameters and optimizer state sharded over this axis
  c.mesh.tensor = 1  # tensor parallel over the inner dimension
  # Multi-process runs (train/distributed.py); None: from $JAX_COORDINATOR_ADDRESS,
  # $JAX_NUM_PROCESSES, $JAX_PROCESS_ID, SLURM's variables, or JAX's cluster detection.
  c.mesh.distributed = placeholder(bool)  # multi-process; None: auto-detect a launcher's variables
  c.mesh.coordinator_address = placeholder(str)  # host:port of process 0
  c.mesh.num_processes = placeholder(int)
  c.mesh.process_id = placeholder(int)
  c.mesh.init_timeout = 300  # seconds to wait for every process to join
  c.mesh.heartbeat_timeout = 60  # seconds of silence after which a process counts as dead
  c.mesh.shutdown_timeout = 60  # seconds the exit barrier waits for the others

  c.log_every = 50  # steps between metrics.jsonl rows
  c.eval_every = 1000  # steps between evaluation losses on the held-out cells
  c.eval_batches = 10  # batches of held-out cells per evaluation
  c.checkpoint_every = 1000  # steps between checkpoints (also at the end and on a signal)
  c.keep_checkpoints = 3  # the latest checkpoints kept
  c.profile_steps = ()  # (first, last) step of a jax.profiler trace, e.g. (10, 15)
  c.lock()  # a misspelt key in a config file fails instead of adding a new one
  return c


def comment_sources() -> list[tuple[object, str]]:
  """Where `--help` finds each key's comment (see `genemamba_jax.cli.key_comments`)."""
  return [(default_config, "")]


def model_config(c: ml_collections.ConfigDict, vocab_size: int, streams: str) -> GeneMambaConfig:
  """The GeneMambaConfig of a training config; DataError names a bad key or value."""
  fields = dict(c.model)
  fields["vocab_size"] = fields["vocab_size"] or vocab_size
  fields["dt_rank"] = fields["dt_rank"] or None
  fields["d_state"] = fields["d_state"] or None
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
    raise DataError("set data.path to a tokenized directory (prepare tokenize) or several "
                    "comma-separated, or to demo:pbmc68k_reduced for the embedded demo data")
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
