"""GeneMambaConfig: every size and switch of the model in one frozen dataclass."""

from __future__ import annotations

import dataclasses
import math

from genemamba_jax.ops import scan_utils

MIXERS = ("mamba1", "mamba2")
COMBINES = ("mean", "sum", "concat", "gate")
RESIDUALS = ("around", "inside", "identity")
STREAMS = ("mixed", "separate")
# "in_proj_and_scan_saveable" is ours (see `layer_remat_policy`); the others are
# jax.checkpoint_policies names.
REMAT_POLICIES = ("in_proj_and_scan_saveable", "nothing_saveable", "dots_saveable",
                  "dots_with_no_batch_dims_saveable", "everything_saveable")
# The activations `in_proj_and_scan_saveable` keeps, tagged with `checkpoint_name` in the mixers.
SAVED_ACTIVATIONS = ("in_proj", "scan_output")
SCAN_BACKENDS = scan_utils.SELECTABLE  # defined with the ops that implement them
DTYPES = ("float32", "bfloat16")


@dataclasses.dataclass(frozen=True)
class GeneMambaConfig:
  """Model hyperparameters. Defaults are the paper's model (65.74M parameters).

  Sizes follow mamba_ssm: d_inner = expand * d_model; Mamba-2 has d_inner /
  headdim heads and ngroups groups of B/C; Mamba-1 has dt_rank = ceil(d_model /
  16) unless given. `d_state=None` means mamba_ssm's default for the mixer: 16
  for Mamba-1, 64 for Mamba-2 (what the released GeneMamba weights use).
  """
  vocab_size: int = 25_426
  d_model: int = 512
  n_layers: int = 24
  mixer: str = "mamba2"  # one of MIXERS
  d_state: int | None = None
  d_conv: int = 4
  expand: int = 2
  headdim: int = 64  # Mamba-2 head size P
  ngroups: int = 1  # Mamba-2 groups of B and C
  dt_rank: int | None = None  # Mamba-1; None = ceil(d_model / 16)
  dt_min: float = 0.001
  dt_max: float = 0.1
  dt_init_floor: float = 1e-4
  A_init_range: tuple[float, float] = (1.0, 16.0)  # Mamba-2 A = -uniform(range)
  conv_bias: bool = True
  proj_bias: bool = False  # in_proj / out_proj bias (mamba_ssm: False)
  norm_eps: float = 1e-5
  # Bidirectional combination of the forward and reverse streams of a layer.
  combine: str = "mean"  # one of COMBINES
  shared_combine: bool = False  # one concat/gate Linear for all layers (original code)
  # "mixed": the streams are combined in every layer (paper, original code).
  # "separate": forward and reverse streams run apart through all layers (shared
  # weights) and are combined only at the top, which makes a leak-free
  # bidirectional next-gene objective possible (see genemamba_jax.train.objectives).
  streams: str = "mixed"  # one of STREAMS
  # Where a mixed layer's residual joins, with f, b the mixer run on the sequence and on its
  # reverse. "around": x + combine(f(x), b(x)), ours and the paper's equation. "inside":
  # combine(x + f(x), x + b(x)), what the original PyTorch code computes (equal for mean, not
  # for sum, concat and gate). "identity": combine(x, x), the original's public code, whose
  # layers return their input and discard the mixer's output (docs/commands.md, "Using the
  # original PyTorch GeneMamba checkpoints"). Separate streams: "around" and "inside" are the same.
  residual: str = "around"  # one of RESIDUALS
  prenorm: bool = False  # RMSNorm before each layer's mixer (the original has none)
  tie_embeddings: bool = False  # original: untied LM head with bias
  lm_head_bias: bool = True
  pad_id: int = 0
  dtype: str = "float32"  # one of DTYPES: the compute dtype; parameters stay float32
  # auto: Mamba-1 runs the Pallas kernel on GPU, the numba kernels on CPU (fastest there for
  # training, bench/RESULTS.md) and chunked on TPU; Mamba-2 runs the chunked SSD everywhere.
  # See ops/selective_scan.py and docs/model.md.
  scan_backend: str = "auto"  # one of SCAN_BACKENDS
  scan_chunk_size: int = 64  # for the chunked backend
  # remat: each layer keeps for the backward only what `remat_policy` names and recomputes the
  # rest. The default policy keeps the mixer's in_proj output and scan output ([B, L, ~3
  # d_inner] per direction) and recomputes the conv, activations, gating and norms, which is
  # also the fastest choice under the layer scan: XLA copies every kept activation into stacked
  # [n_layers, ...] buffers, and keeping everything (remat=False) copies several times more
  # (bench/RESULTS.md, train step by variant). nothing_saveable recomputes whole layers (least
  # memory); everything_saveable / remat=False keeps everything.
  remat: bool = True
  remat_policy: str = "in_proj_and_scan_saveable"  # one of REMAT_POLICIES

  def __post_init__(self):
    def fail(msg):
      raise ValueError(f"GeneMambaConfig: {msg}")
    if self.mixer not in MIXERS:
      fail(f"mixer={self.mixer!r}; use one of {MIXERS}")
    if self.combine not in COMBINES:
      fail(f"combine={self.combine!r}; use one of {COMBINES}")
    if self.scan_backend not in SCAN_BACKENDS:
      fail(f"scan_backend={self.scan_backend!r}; use one of {SCAN_BACKENDS}")
    if self.remat_policy not in REMAT_POLICIES:
      fail(f"remat_policy={self.remat_policy!r}; use one of {REMAT_POLICIES}")
    if self.streams not in STREAMS:
      fail(f"streams={self.streams!r}; use one of {STREAMS}")
    if self.residual not in RESIDUALS:
      fail(f"residual={self.residual!r}; use one of {RESIDUALS}")
    if self.dtype not in DTYPES:
      fail(f"dtype={self.dtype!r}; use one of {DTYPES}")
    for name in ("vocab_size", "d_model", "n_layers", "d_conv", "expand", "headdim", "ngroups",
                 "scan_chunk_size"):
      if getattr(self, name) < 1:
        fail(f"{name}={getattr(self, name)} must be >= 1")
    if self.d_state is not None and self.d_state < 1:
      fail(f"d_state={self.d_state} must be >= 1")
    if self.mixer == "mamba2":
      if self.d_inner % self.headdim:
        fail(f"d_inner={self.d_inner} (expand * d_model) is not a multiple of headdim={self.headdim}")
      if self.nheads % self.ngroups:
        fail(f"nheads={self.nheads} is not a multiple of ngroups={self.ngroups}")
    if self.tie_embeddings and self.lm_head_bias is None:
      fail("tie_embeddings needs lm_head_bias True or False")
    if not 0 <= self.pad_id < self.vocab_size:
      fail(f"pad_id={self.pad_id} is not a token id of a vocabulary of {self.vocab_size}")

  @property
  def d_inner(self) -> int:
    return self.expand * self.d_model

  @property
  def state_size(self) -> int:
    """N: d_state, or mamba_ssm's default for the mixer."""
    if self.d_state is not None:
      return self.d_state
    return 16 if self.mixer == "mamba1" else 64

  @property
  def nheads(self) -> int:
    return self.d_inner // self.headdim

  @property
  def time_step_rank(self) -> int:
    return self.dt_rank if self.dt_rank is not None else math.ceil(self.d_model / 16)

  def replace(self, **changes) -> "GeneMambaConfig":
    return dataclasses.replace(self, **changes)
