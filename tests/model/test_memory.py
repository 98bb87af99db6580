"""The default training path keeps no [B, L, d_inner, N] tensor.

The real train step (`genemamba_jax.train.step.pretraining_core`: default objective,
the model's default scan backend, i.e. on CPU the numba kernels for Mamba-1 and
the chunked SSD for Mamba-2, AdamW) is lowered and
compiled for state sizes N = 16, 32, 64, and XLA's buffer plan
(`memory_analysis().temp_size_in_bytes`) is compared: keeping one
[B, L, d_inner, N] float32 activation per layer would add
n_layers * B * L * d_inner * dN * 4 bytes; the measured growth must stay below
a quarter of that. Nothing is allocated or run, only compiled.

Legitimate N-dependent buffers remain and set the sizes here: O(B * L * N)
tensors (B and C, the in_proj and conv outputs and their gradients, a few
dozen per layer), the chunk boundary states [L / chunk, B, d_inner, N] and one
chunk's recomputation [chunk, B, d_inner, N] in the backward. At d_model 64
and L 256 these are as large as the tensor the test looks for (measured growth
of 40-90% of it for both mixers), so it could not tell them apart. With
d_inner 512 and L 4096 they are 10-15% of it, while the sequential backend,
which does keep every step's state, grows by about 9 times it.

The numba kernels allocate their outputs and the backward's partials on the
host, outside XLA's plan (their results are then copied into XLA buffers, which
the plan does count); `cpu_scan.host_bytes` gives that peak, and it is checked
by the same rule.
"""

import itertools

import jax
import pytest

from genemamba_jax.model import GeneMambaConfig
from genemamba_jax.ops import cpu_scan
from genemamba_jax.train import config as train_config
from genemamba_jax.train import objectives, sharding
from genemamba_jax.train import step as step_lib

D_MODEL, LAYERS, SEQ_LEN, BATCH, VOCAB = 256, 2, 4096, 2, 100
STATES = (16, 32, 64)


def model_config(mixer: str, d_state: int, **overrides) -> GeneMambaConfig:
  """The model the default objective trains (separate streams), at this test's sizes."""
  return GeneMambaConfig(vocab_size=VOCAB, d_model=D_MODEL, n_layers=LAYERS, mixer=mixer,
                         d_state=d_state, streams="separate", **overrides)


def temp_bytes(mixer: str, d_state: int, **overrides) -> int:
  """Planned temporary bytes of the compiled train step for this state size."""
  c = train_config.default_config()
  core = step_lib.pretraining_core(model_config(mixer, d_state, **overrides),
                                   objectives.ObjectiveConfig(), c.optimizer, 100,
                                   sharding.make_mesh(c.mesh, jax.devices()[:1]))
  batch = {"tokens": jax.ShapeDtypeStruct((BATCH, SEQ_LEN), "int32"),
           "mask": jax.ShapeDtypeStruct((BATCH, SEQ_LEN), "bool")}
  compiled = core.lower(core.restore_target(), batch).compile()
  return compiled.memory_analysis().temp_size_in_bytes


@pytest.mark.slow  # over ~10 s on 2 cores
@pytest.mark.parametrize("mixer", ["mamba1", "mamba2"])
def test_train_step_memory_has_no_length_by_inner_by_state_tensor(mixer):
  config = model_config(mixer, STATES[0])
  # The default training path: the model's default backend and remat policy.
  assert config.scan_backend == GeneMambaConfig.scan_backend
  assert (config.remat, config.remat_policy) == (GeneMambaConfig.remat,
                                                 GeneMambaConfig.remat_policy)
  temps = {n: temp_bytes(mixer, n) for n in STATES}
  assert temps[STATES[0]] > 0
  for low, high in itertools.pairwise(STATES):
    kept = LAYERS * BATCH * SEQ_LEN * config.d_inner * (high - low) * 4
    growth = temps[high] - temps[low]
    assert growth < 0.25 * kept, (
        f"{mixer}: N {low} -> {high} adds {growth / 2**20:.1f} MiB of temporaries, "
        f">= 25% of the {kept / 2**20:.0f} MiB one [B, L, d_inner, N] tensor per layer "
        f"would add; temps by N: {temps}")


@pytest.mark.slow  # over ~10 s on 2 cores
@pytest.mark.parametrize("mixer", ["mamba1", "mamba2"])
def test_default_remat_policy_keeps_less_than_keeping_everything(mixer):
  """The default remat policy keeps the mixers' in_proj and scan outputs only: the conv,
  activation, gating and norm outputs are recomputed, not stored per layer."""
  kept = temp_bytes(mixer, STATES[0])
  everything = temp_bytes(mixer, STATES[0], remat=False)
  assert kept < 0.7 * everything, (kept / 2**20, everything / 2**20)


def test_numba_kernel_host_memory_has_no_length_by_inner_by_state_tensor():
  d_inner = 2 * D_MODEL
  host = {n: cpu_scan.host_bytes(2 * BATCH, SEQ_LEN, d_inner, n, 64, grad=True)
          for n in STATES}
  for low, high in itertools.pairwise(STATES):
    kept = 2 * BATCH * SEQ_LEN * d_inner * (high - low) * 4  # one [2B, L, d_inner, dN] tensor
    assert host[high] - host[low] < 0.25 * kept, host
