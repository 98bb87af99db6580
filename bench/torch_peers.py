"""PyTorch peers of our GeneMamba train step, for a side-by-side on the same machine.

Same layout as `genemamba_jax.model`: embedding -> N BiMamba layers -> RMSNorm
-> Linear head with bias. A layer is our `BiMambaLayer` with `combine="mean"`:
one mixer (shared weights) run on the sequence and on its reversal in a single
call on [2B, L, d], x + (fwd + flip(bwd)) / 2. Rows are full (no padding), so
reversing the valid tokens is a plain flip. Mixers are independent PyTorch
implementations with mamba_ssm's parameterization:

  mamba2  transformers' `Mamba2Mixer` (its pure-torch chunked SSD path on CPU)
  mamba1  mambapy's `MambaBlock` with its parallel scan (`pscan=True`)

A train step is forward, next-token cross-entropy, backward, gradient
clipping at 1.0 and AdamW (betas 0.9 / 0.95, weight decay 0.1): the work our
step does, in PyTorch eager mode.
"""

from __future__ import annotations

import math
import os
import statistics
import time

import torch
from torch import nn


def make_mixer(mixer: str, d_model: int, d_state: int, headdim: int = 64, expand: int = 2,
               n_groups: int = 1, d_conv: int = 4, chunk_size: int = 64) -> nn.Module:
  """One sequence mixer, [b, L, d_model] -> [b, L, d_model], as our GeneMambaConfig sizes it.

  chunk_size: Mamba-2's SSD chunk (ours is 64; transformers' default is 256).
  """
  if mixer == "mamba2":
    from transformers import Mamba2Config  # pylint: disable=g-import-not-at-top
    from transformers.models.mamba2 import modeling_mamba2  # pylint: disable=g-import-not-at-top
    d_inner = expand * d_model
    config = Mamba2Config(
        hidden_size=d_model, num_heads=d_inner // headdim, head_dim=headdim, state_size=d_state,
        n_groups=n_groups, expand=expand, conv_kernel=d_conv, use_bias=False, use_conv_bias=True,
        layer_norm_epsilon=1e-5, time_step_limit=(0.0, float("inf")), chunk_size=chunk_size,
        num_hidden_layers=1)
    return modeling_mamba2.Mamba2Mixer(config, layer_idx=0)
  if mixer == "mamba1":
    from mambapy.mamba import MambaBlock, MambaConfig  # pylint: disable=g-import-not-at-top
    return MambaBlock(MambaConfig(
        d_model=d_model, n_layers=1, dt_rank=math.ceil(d_model / 16), d_state=d_state,
        expand_factor=expand, d_conv=d_conv, pscan=True))
  raise ValueError(f"mixer={mixer!r}; use 'mamba1' or 'mamba2'")


class BiMambaLayer(nn.Module):
  """x + (mixer(x) + flip(mixer(flip(x)))) / 2, both directions in one mixer call."""

  def __init__(self, mixer: nn.Module):
    super().__init__()
    self.mixer = mixer

  def forward(self, x: torch.Tensor) -> torch.Tensor:
    """x: [B, L, d] -> [B, L, d]."""
    both = self.mixer(torch.cat([x, x.flip(1)], dim=0))
    forward, backward = both.chunk(2, dim=0)
    return x + (forward + backward.flip(1)) * 0.5


class PeerModel(nn.Module):
  """Embedding -> BiMamba layers -> RMSNorm -> Linear head (bias), like GeneMamba."""

  def __init__(self, mixer: str, d_model: int, layers: int, vocab: int, d_state: int,
               **mixer_kwargs):
    super().__init__()
    self.embeddings = nn.Embedding(vocab, d_model)
    nn.init.normal_(self.embeddings.weight, std=0.02)
    self.layers = nn.ModuleList(
        BiMambaLayer(make_mixer(mixer, d_model, d_state, **mixer_kwargs)) for _ in range(layers))
    self.norm_f = nn.RMSNorm(d_model, eps=1e-5)
    self.lm_head = nn.Linear(d_model, vocab, bias=True)

  def forward(self, tokens: torch.Tensor) -> torch.Tensor:
    """tokens [B, L] int64 -> logits [B, L, vocab]."""
    x = self.embeddings(tokens)
    for layer in self.layers:
      x = layer(x)
    return self.lm_head(self.norm_f(x))


def next_token_loss(logits: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
  """Cross-entropy of logits[:, :-1] against tokens[:, 1:] (GeneMamba's original L_lang)."""
  vocab = logits.shape[-1]
  return nn.functional.cross_entropy(logits[:, :-1].reshape(-1, vocab),
                                     tokens[:, 1:].reshape(-1))


def time_torch_train_step(mixer: str, d_model: int, layers: int, seq_len: int, batch: int,
                          vocab: int, d_state: int, steps: int = 5, warmup: int = 1,
                          seed: int = 0, **mixer_kwargs) -> dict:
  """Times `steps` full train steps after `warmup` untimed ones, on all CPU cores.

  Returns:
    {"tokens_per_s": batch * seq_len * steps / total seconds, "step_ms_median",
    "step_ms_min", "loss" (of the last step), "threads"}.
  """
  if steps < 1 or warmup < 0:
    raise ValueError(f"need steps >= 1 and warmup >= 0, got steps={steps}, warmup={warmup}")
  torch.set_num_threads(os.cpu_count())
  torch.manual_seed(seed)
  model = PeerModel(mixer, d_model, layers, vocab, d_state, **mixer_kwargs).train()
  # Same recipe as ours (genemamba_jax.train.optimizer); the decay mask is
  # irrelevant to speed, so every parameter is decayed here.
  opt = torch.optim.AdamW(model.parameters(), lr=6e-4, betas=(0.9, 0.95), eps=1e-8,
                          weight_decay=0.1)
  generator = torch.Generator().manual_seed(seed)
  tokens = torch.randint(4, vocab, (batch, seq_len), generator=generator)

  def step() -> float:
    opt.zero_grad(set_to_none=True)
    loss = next_token_loss(model(tokens), tokens)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    opt.step()
    return loss.item()  # .item() waits for the step, like block_until_ready

  for _ in range(warmup):
    step()
  times = []
  for _ in range(steps):
    t0 = time.perf_counter()
    loss = step()
    times.append(time.perf_counter() - t0)
  return {"tokens_per_s": batch * seq_len * steps / sum(times),
          "step_ms_median": 1e3 * statistics.median(times), "step_ms_min": 1e3 * min(times),
          "loss": loss, "threads": torch.get_num_threads()}


def torch_tokens_per_s(mixer: str, d_model: int, layers: int, seq_len: int, batch: int,
                       vocab: int, d_state: int, steps: int = 5, **kwargs) -> float:
  """Tokens per second of the peer's full train step (forward, backward, optimizer)."""
  return time_torch_train_step(mixer, d_model, layers, seq_len, batch, vocab, d_state, steps,
                               **kwargs)["tokens_per_s"]
