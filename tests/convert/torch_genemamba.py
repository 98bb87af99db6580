"""An independent PyTorch model of the ORIGINAL GeneMamba, and its checkpoint format.

A test oracle for the converter between the original PyTorch checkpoints
(MineSelf2016/mamba_dev, genemamba/models/models.py) and ours; it is not part of
the package. It is written from a description of what the original computes,
not copied from it:

* `MambaModel`: embeddings -> `mamba_mixer` (a bidirectional stack of Mamba-2
  encoder layers) -> `norm_f` (RMSNorm) -> `lm_head` (Linear WITH bias). Its
  forward returns the logits and the hidden states after `norm_f`.
* Each mixer layer runs one shared Mamba-2 forward over the sequence and over
  its reverse, flips the second result back, and combines the two ("mean",
  "concat", "sum" or "gate"; concat and gate share ONE `aggr` Linear(2d, d)
  across all layers). With a padding mask only the valid prefix of each row is
  reversed (`flip_sc`); without one the whole row is.
* The public `EncoderLayer` computes `mamba(X) + X` but returns `X`, so every
  layer is the identity ("identity layers"); a public fork returns the residual
  sum ("residual layers", the paper's model). `identity_layers` picks one.
* Mamba-2 (mamba_ssm defaults: d_state 64, d_conv 4, expand 2, headdim 64,
  ngroups 1, gated RMSNorm after the gate, eps 1e-5, no in/out projection bias,
  conv bias, no dt clamp) is transformers' `Mamba2Mixer` on its CPU torch path,
  which has mamba_ssm's parameter names.

Its checkpoint directory (config.json, model.safetensors, gene_tokenizer.json) and the
original's vocabulary: tests/convert/torch_genemamba_files.py.

Everything here is float32 on the CPU.
"""

import math

import torch
from torch import nn

MODES = ("mean", "concat", "sum", "gate")
# mamba_ssm Mamba2 as the original builds it: Mamba2(d_model, d_state=64,
# d_conv=4, expand=2) with every other argument at its default.
D_STATE, D_CONV, EXPAND, HEADDIM, NGROUPS, NORM_EPS = 64, 4, 2, 64, 1, 1e-5
CLS_TOKEN = "[CLS]"


def flip_sc(x: torch.Tensor, padding_mask: torch.Tensor) -> torch.Tensor:
  """Reverses the valid prefix of every row; padding positions stay put.

  Args:
    x: [B, L, D].
    padding_mask: [B, L] bool, True at PADDING (the original's convention).
      Only the count of valid tokens per row is used, so it assumes right
      padding, as the original does.

  Returns:
    [B, L, D]: out[b, p] = x[b, n_b - 1 - p] for p < n_b (n_b valid tokens in
    row b), x[b, p] otherwise. The map is an involution: flip_sc(flip_sc(x)) == x.
  """
  batch, length, dim = x.shape
  lengths = (~padding_mask).sum(dim=1, keepdim=True)  # [B, 1]
  pos = torch.arange(length, device=x.device).unsqueeze(0).expand(batch, -1)
  src = torch.where(pos < lengths, lengths - 1 - pos, pos)  # [B, L]
  return torch.gather(x, 1, src.unsqueeze(-1).expand(-1, -1, dim))


def mamba2_config(d_model: int, n_layers: int = 1, chunk_size: int = 256):
  """transformers' Mamba2Config that reproduces mamba_ssm's Mamba2 defaults.

  transformers' gated norm normalises norm(y * silu(z)) over groups of
  d_inner / n_groups, as mamba_ssm's RMSNormGated(norm_before_gate=False)
  does, and time_step_limit (0, inf) makes its dt clamp a no-op, as mamba_ssm's
  default dt_limit does.
  """
  from transformers import Mamba2Config  # pylint: disable=g-import-not-at-top
  d_inner = EXPAND * d_model
  if d_inner % HEADDIM:
    raise ValueError(f"d_model {d_model}: expand * d_model = {d_inner} is not a multiple of "
                     f"headdim {HEADDIM}")
  return Mamba2Config(hidden_size=d_model, num_heads=d_inner // HEADDIM, head_dim=HEADDIM,
                      state_size=D_STATE, n_groups=NGROUPS, expand=EXPAND, conv_kernel=D_CONV,
                      use_bias=False, use_conv_bias=True, hidden_act="silu",
                      layer_norm_epsilon=NORM_EPS, time_step_limit=(0.0, float("inf")),
                      chunk_size=chunk_size, num_hidden_layers=max(n_layers, 1))


class RMSNorm(nn.Module):
  """mamba_ssm's RMSNorm: y = x * rsqrt(mean(x^2) + eps) * weight, in float32."""

  def __init__(self, d_model: int, eps: float = NORM_EPS):
    super().__init__()
    self.eps = eps
    self.weight = nn.Parameter(torch.ones(d_model))

  def forward(self, x: torch.Tensor) -> torch.Tensor:
    """[..., d] -> [..., d]."""
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps) * self.weight


class EncoderLayer(nn.Module):
  """One Mamba-2 block; `mamba` holds the parameters (state-dict prefix `mamba.`)."""

  def __init__(self, d_model: int, layer_idx: int, n_layers: int, identity_layers: bool,
               chunk_size: int):
    super().__init__()
    from transformers.models.mamba2.modeling_mamba2 import Mamba2Mixer  # pylint: disable=g-import-not-at-top
    self.identity_layers = identity_layers
    self.mamba = Mamba2Mixer(mamba2_config(d_model, n_layers, chunk_size), layer_idx=layer_idx)

  def forward(self, x: torch.Tensor) -> torch.Tensor:
    """[B, L, d] -> [B, L, d]."""
    if self.identity_layers:
      # The public code computes mamba(x) + x and then returns x: the result
      # is discarded, so skipping the computation changes no output.
      return x
    # No attention mask: the original calls Mamba2 on the whole padded row.
    return self.mamba(x) + x


class MambaMixer(nn.Module):
  """The original's `mamba_mixer`: bidirectional layers combined per `mode`."""

  def __init__(self, mode: str, d_model: int, n_layers: int, identity_layers: bool,
               chunk_size: int):
    super().__init__()
    if mode not in MODES:
      # The original raises only in forward; failing at construction is kinder.
      raise ValueError(f"mode {mode!r} is not one of {MODES}")
    self.mode = mode
    self.layers = nn.ModuleList(
        EncoderLayer(d_model, i, n_layers, identity_layers, chunk_size) for i in range(n_layers))
    if mode in ("concat", "gate"):
      self.aggr = nn.Linear(2 * d_model, d_model)  # one Linear shared by every layer

  def forward(self, x: torch.Tensor, padding_mask: torch.Tensor | None = None) -> torch.Tensor:
    """x [B, L, d], padding_mask [B, L] bool (True at padding) or None -> [B, L, d]."""
    if padding_mask is None:
      flip = lambda t: t.flip([1])
    else:
      padding_mask = padding_mask.to(torch.bool)
      flip = lambda t: flip_sc(t, padding_mask)
    for layer in self.layers:
      x_f = layer(x)
      x_b = flip(layer(flip(x)))
      if self.mode == "mean":
        x = (x_f + x_b) / 2
      elif self.mode == "concat":
        x = self.aggr(torch.cat([x_f, x_b], dim=-1))
      elif self.mode == "sum":
        x = x_f + x_b
      else:  # gate
        z = torch.sigmoid(self.aggr(torch.cat([x_f, x_b], dim=-1)))
        x = z * x_f + (1 - z) * x_b
    return x


class OriginalMambaModel(nn.Module):
  """The original GeneMamba `MambaModel` (state-dict keys as the original's).

  Keys: embeddings.weight; mamba_mixer.layers.{i}.mamba.{in_proj.weight,
  conv1d.weight, conv1d.bias, dt_bias, A_log, D, norm.weight, out_proj.weight};
  mamba_mixer.aggr.{weight,bias} (concat/gate only); norm_f.weight;
  lm_head.weight; lm_head.bias.

  Built in eval mode: the model has no dropout, but transformers' Mamba2Mixer
  tries a fused-kernel hook in training mode before its torch path.
  """

  def __init__(self, vocab_size: int, d_model: int, n_layers: int, mode: str = "mean",
               identity_layers: bool = False, chunk_size: int = 256):
    super().__init__()
    self.vocab_size, self.d_model, self.n_layers = vocab_size, d_model, n_layers
    self.mode, self.identity_layers, self.chunk_size = mode, identity_layers, chunk_size
    self.embeddings = nn.Embedding(vocab_size, d_model)
    self.mamba_mixer = MambaMixer(mode, d_model, n_layers, identity_layers, chunk_size)
    self.norm_f = RMSNorm(d_model)
    self.lm_head = nn.Linear(d_model, vocab_size)
    self.eval()

  def forward(self, input_ids: torch.Tensor, padding_mask: torch.Tensor | None = None):
    """input_ids [B, L] int, padding_mask [B, L] bool (True at padding) or None.

    Returns:
      (logits [B, L, V], hidden [B, L, d]); hidden is after norm_f, as the
      original's `hidden_states`.
    """
    x = self.embeddings(input_ids)
    x = self.mamba_mixer(x, padding_mask)
    hidden = self.norm_f(x)
    return self.lm_head(hidden), hidden


# --- weights -------------------------------------------------------------------------


def _randomize_model(model: OriginalMambaModel, g: torch.Generator):
  d, n = model.d_model, max(model.n_layers, 1)
  d_inner = EXPAND * d

  def randn(p, std=1.0, mean=0.0):
    return torch.randn(p.shape, generator=g) * std + mean

  def rand(p):
    return torch.rand(p.shape, generator=g)

  for name, p in model.named_parameters():
    ssm = name.rsplit(".mamba.", 1)[-1] if ".mamba." in name else None
    if name == "embeddings.weight":
      new = randn(p)
    elif ssm == "in_proj.weight":
      new = randn(p, 1 / math.sqrt(d))
    elif ssm == "conv1d.weight":
      new = randn(p, 0.4)
    elif ssm == "conv1d.bias":
      new = randn(p, 0.2)
    elif ssm == "dt_bias":
      new = rand(p) * 5 - 4  # softplus -> dt in ~(0.02, 1.3)
    elif ssm == "A_log":
      new = torch.log1p(rand(p) * 15)  # A in -(1, 16)
    elif ssm == "D":
      new = randn(p, 0.5, 1.0)
    elif ssm == "norm.weight":
      new = randn(p, 0.5, 1.0)
    elif ssm == "out_proj.weight":
      # Small enough that n residual layers add O(1) in all: each adds
      # ~0.6 / sqrt(n) RMS to the stream whatever the width.
      new = randn(p, 0.6 / math.sqrt(d_inner * n))
    elif name == "mamba_mixer.aggr.weight":
      # W1 + W2 (std s * sqrt 2 per entry) then has spectral radius ~0.9, so
      # concat mode with identity layers (x <- (W1 + W2) x + b, n times)
      # neither explodes nor dies out.
      new = randn(p, 0.9 / math.sqrt(2 * d))
    elif name == "mamba_mixer.aggr.bias":
      new = randn(p, 0.1)
    elif name == "norm_f.weight":
      new = randn(p, 0.3, 1.0)
    elif name == "lm_head.weight":
      new = randn(p, 1 / math.sqrt(d))
    elif name == "lm_head.bias":
      new = randn(p, 0.5)
    else:
      raise ValueError(f"randomize_: no rule for parameter {name!r}")
    p.copy_(new)


def _randomize_classifier(classifier: "OriginalClassifier", g: torch.Generator):
  for module in classifier.layers:
    if isinstance(module, nn.Linear):
      module.weight.copy_(torch.randn(module.weight.shape, generator=g) /
                          math.sqrt(module.in_features))
      module.bias.copy_(torch.randn(module.bias.shape, generator=g) * 0.1)
    elif isinstance(module, nn.BatchNorm1d):
      shape = module.weight.shape
      module.weight.copy_(torch.randn(shape, generator=g) * 0.3 + 1)
      module.bias.copy_(torch.randn(shape, generator=g) * 0.1)
      module.running_mean.copy_(torch.randn(shape, generator=g) * 0.3)
      module.running_var.copy_(torch.rand(shape, generator=g) + 0.5)
      module.num_batches_tracked.fill_(int(torch.randint(1, 1000, (), generator=g)))


@torch.no_grad()
def randomize_(module: nn.Module, seed: int) -> nn.Module:
  """Non-trivial random weights for every tensor of a model or classifier, in place.

  OriginalMambaModel: random dt_bias, A_log spread over A in -(1, 16), D and
  gated-norm weights around 1, conv bias, aggr, norm_f and lm_head bias, so
  that parity tests exercise every parameter; out_proj is scaled down so a
  24-layer residual stack stays O(1). Mode "sum" with identity layers still
  doubles x every layer: that is the original's arithmetic, so use few layers.
  OriginalClassifier: random Linear weights and BatchNorm affine parameters and
  running statistics.

  Returns the module.
  """
  g = torch.Generator().manual_seed(seed)
  if isinstance(module, OriginalMambaModel):
    _randomize_model(module, g)
  elif isinstance(module, OriginalClassifier):
    _randomize_classifier(module, g)
  else:
    raise TypeError(f"randomize_: {type(module).__name__} is not supported")
  return module


@torch.no_grad()
def add_cls_row_(model: OriginalMambaModel, seed: int) -> OriginalMambaModel:
  """The original's `resize_token_embeddings` for fine-tuning, in place: V -> V + 1.

  The new embedding row and lm_head weight row are the means of the old rows;
  the whole lm_head bias, old entries included, is a fresh nn.Linear(d, V + 1)'s
  random init, because the original copies only the weight rows into the new
  Linear. The fresh init is drawn under `seed` without touching the global RNG.
  """
  old_emb, old_head = model.embeddings.weight, model.lm_head.weight
  v, d = old_emb.shape
  with torch.random.fork_rng(devices=[]):
    torch.manual_seed(seed)
    embeddings = nn.Embedding(v + 1, d)
    lm_head = nn.Linear(d, v + 1)
  embeddings.weight[:v] = old_emb
  embeddings.weight[v] = old_emb.mean(dim=0)
  lm_head.weight[:v] = old_head
  lm_head.weight[v] = old_head.mean(dim=0)
  model.embeddings, model.lm_head = embeddings, lm_head
  model.vocab_size = v + 1
  return model


# --- classification head -------------------------------------------------------------


class OriginalClassifier(nn.Module):
  """The original's `Classifier`: [Linear, BatchNorm1d, Dropout(0.5), LeakyReLU(0.1)]
  x (num_layers - 1), then Linear(hidden, out); keys layers.{i}.*.

  The annotation script uses hidden_features 512, num_layers 4 on the final
  hidden state at position 0 ([CLS]). Built in eval mode (running statistics,
  no dropout), the inference behaviour parity tests compare.
  """

  def __init__(self, input_features: int, output_features: int, hidden_features: int,
               num_layers: int = 3):
    super().__init__()
    layers, width = [], input_features
    for _ in range(num_layers - 1):
      layers += [nn.Linear(width, hidden_features), nn.BatchNorm1d(hidden_features),
                 nn.Dropout(0.5), nn.LeakyReLU(0.1)]
      width = hidden_features
    layers.append(nn.Linear(width, output_features))
    self.layers = nn.ModuleList(layers)
    self.eval()

  def forward(self, x: torch.Tensor) -> torch.Tensor:
    """[B, input_features] -> [B, output_features]."""
    for layer in self.layers:
      x = layer(x)
    return x
