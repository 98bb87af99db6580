"""Mamba-1 / Mamba-2 mixers: parity with PyTorch on identical weights, state-dict
conversion, logical axis names, init, bf16 compute.

The parity tests need the `parity` extra (torch, transformers, mambapy) and
skip without it.
"""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from genemamba_jax.model.config import GeneMambaConfig
from genemamba_jax.model.convert import load_mixer_state_dict, mixer_state_dict
from genemamba_jax.model.layers import AXIS_NAMES, unfused_copy
from genemamba_jax.model.mixers import Mamba1Mixer, Mamba2Mixer
from tests.conftest import fast_first, require_parity

BACKENDS = ("sequential", "associative", "chunked")
BATCH, LENGTH = 2, 64
# d_model 48 gives dt_rank 3; Mamba-2: d_inner 96, 3 heads of 32, 3 groups of B/C
# would tie heads to groups one to one, so 2 heads per group: headdim 16 -> 6 heads.
M1 = GeneMambaConfig(mixer="mamba1", d_model=48, d_state=8, scan_chunk_size=16)
M2 = GeneMambaConfig(mixer="mamba2", d_model=48, d_state=16, headdim=16, ngroups=3,
                     scan_chunk_size=16)


def _torch():
  return require_parity("torch")


def _randomize(module, torch, seed):
  """Non-trivial weights: random dt bias, D, A, norm weight and conv bias too."""
  g = torch.Generator().manual_seed(seed)
  with torch.no_grad():
    for name, p in module.named_parameters():
      if name.endswith("dt_bias") or name == "dt_proj.bias":
        p.copy_(torch.rand(p.shape, generator=g) * 5 - 4)  # softplus -> dt in ~(0.02, 1.3)
      elif name in ("D", "norm.weight"):
        p.copy_(torch.randn(p.shape, generator=g) * 0.5 + 1)
      elif name == "A_log":
        p.add_(torch.randn(p.shape, generator=g) * 0.3)
      elif name == "conv1d.bias":
        p.copy_(torch.randn(p.shape, generator=g) * 0.2)


def _torch_out_and_grad(torch, module, x, r):
  """module(x) and d(sum(module(x) * r))/dx as numpy."""
  xt = torch.tensor(x, requires_grad=True)
  out = module(xt)
  (out * torch.tensor(r)).sum().backward()
  return out.detach().numpy(), xt.grad.numpy()


def _apply(mixer, x):
  """mixer(x), jitted (eager op-by-op dispatch of the scans is slow)."""
  graphdef, state = nnx.split(mixer)
  return jax.jit(lambda s, u: nnx.merge(graphdef, s)(u))(state, jnp.asarray(x))


def _jax_out_and_grad(mixer, x, r):
  graphdef, state = nnx.split(mixer)

  @jax.jit
  def out_and_grad(state, u):
    f = lambda u: nnx.merge(graphdef, state)(u)
    out, vjp = jax.vjp(f, u)
    return out, vjp(jnp.asarray(r))[0]  # d(sum(out * r))/du

  with jax.default_matmul_precision("highest"):  # no TF32 / bf16 passes on accelerators
    out, grad = out_and_grad(state, jnp.asarray(x))
  return np.asarray(out), np.asarray(grad)


def _inputs(config, seed=0):
  rng = np.random.default_rng(seed)
  x = rng.standard_normal((BATCH, LENGTH, config.d_model)).astype(np.float32)
  r = rng.standard_normal((BATCH, LENGTH, config.d_model)).astype(np.float32)
  return x, r


def _check_parity(torch, modules, config, backend):
  """JAX mixer vs each PyTorch module (all holding the first one's weights)."""
  for module in modules:
    module.eval()  # the unfused PyTorch path (fused kernels are CUDA + training only)
  sd = {k: v.detach().numpy() for k, v in modules[0].state_dict().items()}
  for module in modules[1:]:
    module.load_state_dict({k: torch.tensor(v) for k, v in sd.items()}, strict=True)
  mixer_cls = Mamba1Mixer if config.mixer == "mamba1" else Mamba2Mixer
  mixer = mixer_cls(config.replace(scan_backend=backend), rngs=nnx.Rngs(1))
  load_mixer_state_dict(mixer, sd)
  x, r = _inputs(config)
  out, grad = _jax_out_and_grad(mixer, x, r)
  for module in modules:
    want_out, want_grad = _torch_out_and_grad(torch, module, x, r)
    # Both sides are float32; the differences are summation order, ~1e-6 here.
    np.testing.assert_allclose(out, want_out, atol=1e-4, rtol=0, err_msg=type(module).__name__)
    np.testing.assert_allclose(grad, want_grad, atol=1e-4, rtol=0, err_msg=type(module).__name__)
    assert np.abs(want_out).max() > 1e-2 and np.abs(want_grad).max() > 1e-2  # not vacuous


@fast_first("backend", BACKENDS[::-1])  # chunked: the default
def test_mamba1_matches_transformers_and_mambapy(backend):
  torch = _torch()
  require_parity("transformers")
  require_parity("mambapy")
  from mambapy.mamba import MambaBlock, MambaConfig as PyConfig
  from transformers import MambaConfig
  from transformers.models.mamba.modeling_mamba import MambaMixer
  torch.manual_seed(0)
  # Sequential torch loop (associative_scan is used only under torch.compile).
  hf = MambaConfig(hidden_size=M1.d_model, state_size=M1.state_size, expand=M1.expand,
                   conv_kernel=M1.d_conv, time_step_rank=M1.time_step_rank, use_bias=False,
                   use_conv_bias=True, num_hidden_layers=1, use_mambapy=False,
                   use_associative_scan=False)
  module = MambaMixer(hf, layer_idx=0)
  _randomize(module, torch, seed=1)
  # mambapy's MambaBlock has mamba_ssm's parameter names and layouts: the same
  # state dict loads as is. pscan=True: its parallel scan, a second reference.
  block = MambaBlock(PyConfig(d_model=M1.d_model, n_layers=1, dt_rank=M1.time_step_rank,
                              d_state=M1.state_size, expand_factor=M1.expand, d_conv=M1.d_conv,
                              pscan=True))
  _check_parity(torch, [module, block], M1, backend)


@fast_first("backend", BACKENDS[::-1])
def test_mamba2_matches_transformers(backend):
  torch = _torch()
  require_parity("transformers")
  from transformers import Mamba2Config
  from transformers.models.mamba2.modeling_mamba2 import Mamba2Mixer as HFMamba2Mixer
  torch.manual_seed(0)
  # mamba_ssm semantics: gated RMSNorm norm(y * silu(z)) over groups of
  # d_inner / n_groups (transformers' MambaRMSNormGated does exactly that) and
  # no dt clamping: time_step_limit (0, inf) makes its clamp a no-op. Chunk
  # size 24 does not divide L = 64: its padding path is exercised too.
  hf = Mamba2Config(hidden_size=M2.d_model, num_heads=M2.nheads, head_dim=M2.headdim,
                    state_size=M2.state_size, n_groups=M2.ngroups, expand=M2.expand,
                    conv_kernel=M2.d_conv, use_bias=False, use_conv_bias=True,
                    layer_norm_epsilon=M2.norm_eps, time_step_limit=(0.0, float("inf")),
                    chunk_size=24, num_hidden_layers=1)
  module = HFMamba2Mixer(hf, layer_idx=0)
  _randomize(module, torch, seed=3)
  _check_parity(torch, [module], M2, backend)


@pytest.mark.parametrize("config", [M1, M2], ids=["mamba1", "mamba2"])
def test_state_dict_round_trip_and_strict_loading(config):
  cls = Mamba1Mixer if config.mixer == "mamba1" else Mamba2Mixer
  src, dst = cls(config, rngs=nnx.Rngs(0)), cls(config, rngs=nnx.Rngs(1))
  sd = mixer_state_dict(src)
  load_mixer_state_dict(dst, sd)
  for key, value in mixer_state_dict(dst).items():
    np.testing.assert_array_equal(value, sd[key], err_msg=key)
  x = jnp.asarray(_inputs(config)[0])
  np.testing.assert_array_equal(np.asarray(_apply(dst, x)), np.asarray(_apply(src, x)))

  before = mixer_state_dict(dst)
  missing = {k: v for k, v in sd.items() if k != "D"}
  with pytest.raises(ValueError, match=r"missing keys \['D'\]"):
    load_mixer_state_dict(dst, missing)
  with pytest.raises(ValueError, match=r"unexpected keys \['extra.weight'\]"):
    load_mixer_state_dict(dst, {**sd, "extra.weight": np.zeros(3, np.float32)})
  bad = {**sd, "out_proj.weight": sd["out_proj.weight"].T}
  shape, want = bad["out_proj.weight"].shape, sd["out_proj.weight"].shape
  with pytest.raises(ValueError, match=rf"'out_proj.weight' has shape \({shape[0]}, {shape[1]}\)"
                                       rf".*expects \({want[0]}, {want[1]}\)"):
    load_mixer_state_dict(dst, bad)
  for key, value in mixer_state_dict(dst).items():  # failed loads changed nothing
    np.testing.assert_array_equal(value, before[key], err_msg=key)


def test_torch_layouts():
  sd1 = mixer_state_dict(Mamba1Mixer(M1, rngs=nnx.Rngs(0)))
  d, di, n, r, k = M1.d_model, M1.d_inner, M1.state_size, M1.time_step_rank, M1.d_conv
  assert {k_: v.shape for k_, v in sd1.items()} == {
      "in_proj.weight": (2 * di, d), "conv1d.weight": (di, 1, k), "conv1d.bias": (di,),
      "x_proj.weight": (r + 2 * n, di), "dt_proj.weight": (di, r), "dt_proj.bias": (di,),
      "A_log": (di, n), "D": (di,), "out_proj.weight": (d, di)}
  # The original GeneMamba's layer at d = 512 (its state-dict shapes).
  sd2 = mixer_state_dict(Mamba2Mixer(GeneMambaConfig(), rngs=nnx.Rngs(0)))
  assert {k_: v.shape for k_, v in sd2.items()} == {
      "in_proj.weight": (2192, 512), "conv1d.weight": (1152, 1, 4), "conv1d.bias": (1152,),
      "dt_bias": (16,), "A_log": (16,), "D": (16,), "norm.weight": (1024,),
      "out_proj.weight": (512, 1024)}


EXPECTED_AXES = {
    "mamba1": {"in_proj.kernel": ("embed", "inner"), "conv1d.kernel": ("conv_kernel", None, "inner"),
               "conv1d.bias": ("inner",), "x_proj.kernel": ("inner", None),
               "dt_proj.kernel": ("dt_rank", "inner"), "dt_proj.bias": ("inner",),
               "A_log": ("inner", "state"), "D": ("inner",), "out_proj.kernel": ("inner", "embed")},
    "mamba2": {"in_proj.kernel": ("embed", "inner"), "conv1d.kernel": ("conv_kernel", None, "inner"),
               "conv1d.bias": ("inner",), "dt_bias": ("heads",), "A_log": ("heads",),
               "D": ("heads",), "norm.weight": ("inner",), "out_proj.kernel": ("inner", "embed")},
}


@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("config", [M1, M2], ids=["mamba1", "mamba2"])
def test_every_parameter_has_logical_axis_names(config, bias):
  cls = Mamba1Mixer if config.mixer == "mamba1" else Mamba2Mixer
  mixer = cls(config.replace(proj_bias=bias), rngs=nnx.Rngs(0))
  expected = dict(EXPECTED_AXES[config.mixer])
  if bias:
    expected.update({"in_proj.bias": ("inner",), "out_proj.bias": ("embed",)})
  got = {}
  for path, param in nnx.to_flat_state(nnx.state(mixer, nnx.Param)):
    names = param.get_metadata().get("out_sharding")
    key = ".".join(map(str, path))
    assert names is not None and len(names) == param[...].ndim, (key, names)
    assert all(n in AXIS_NAMES or n is None for n in names), (key, names)
    assert any(n is not None for n in names), key
    got[key] = tuple(names)
  assert got == expected
  specs = nnx.get_partition_spec(nnx.state(mixer, nnx.Param))  # what sharding rules will read
  assert tuple(specs["in_proj"]["kernel"].get_value()) == ("embed", "inner")


def test_init_follows_mamba_ssm():
  m1 = Mamba1Mixer(M1, rngs=nnx.Rngs(0))
  n, r = M1.state_size, M1.time_step_rank
  np.testing.assert_allclose(np.exp(m1.A_log[...]), np.tile(np.arange(1, n + 1), (M1.d_inner, 1)),
                             rtol=1e-6)
  np.testing.assert_array_equal(m1.D[...], 1)
  assert np.abs(m1.dt_proj.kernel[...]).max() <= r ** -0.5
  m2 = Mamba2Mixer(GeneMambaConfig(d_model=256), rngs=nnx.Rngs(0))
  a = np.exp(m2.A_log[...])
  assert a.min() >= M2.A_init_range[0] and a.max() <= M2.A_init_range[1] and a.std() > 1
  np.testing.assert_array_equal(m2.D[...], 1)
  np.testing.assert_array_equal(m2.norm.weight[...], 1)
  for dt_bias, cfg in ((m1.dt_proj.bias[...], M1), (m2.dt_bias[...], m2.config)):
    dt = np.asarray(jax.nn.softplus(dt_bias))
    assert dt.min() >= cfg.dt_init_floor * 0.999 and dt.max() <= cfg.dt_max * 1.001
    # log-uniform over [dt_min, dt_max]: the mean of log dt is mid-range.
    mid = (math.log(cfg.dt_min) + math.log(cfg.dt_max)) / 2
    assert abs(np.log(dt).mean() - mid) < 0.6
  # PyTorch default Linear init: U(+-1/sqrt(fan_in)).
  assert np.abs(m1.in_proj.kernel[...]).max() <= M1.d_model ** -0.5


@pytest.mark.parametrize("config", [M1, M2], ids=["mamba1", "mamba2"])
def test_bfloat16_compute_close_to_float32(config):
  cls = Mamba1Mixer if config.mixer == "mamba1" else Mamba2Mixer
  f32 = cls(config, rngs=nnx.Rngs(0))
  b16 = cls(config.replace(dtype="bfloat16"), rngs=nnx.Rngs(0))
  load_mixer_state_dict(b16, mixer_state_dict(f32))
  assert all(p.dtype == jnp.float32 for p in jax.tree.leaves(nnx.state(b16, nnx.Param)))
  x = jnp.asarray(_inputs(config)[0])
  want, got = np.asarray(_apply(f32, x)), _apply(b16, x)
  assert got.dtype == jnp.bfloat16
  # bf16 keeps 8 significant bits (relative rounding 2^-9 ~ 0.2%); inputs, weights
  # and the in_proj / conv / x_proj / out_proj outputs are each rounded once,
  # with the scan, gating and norm in float32. These roundings compound to
  # ~0.7-0.9% of the output scale (measured, both mixers); 3% leaves room without
  # hiding a wrong path (a bf16 state or a bf16 softplus(dt) is off by far more).
  err = np.abs(np.asarray(got, np.float32) - want).max() / np.abs(want).max()
  assert err < 0.03, err


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_unfused_copy_is_exact(dtype):
  """The conv taps' copy (a matmul by the identity, for XLA's fusion) changes no value, also
  under jit, where the default matmul precision would round float32 on GPUs and TPUs."""
  rng = np.random.default_rng(0)
  magnitudes = 10.0 ** rng.integers(-30, 30, size=(4, 384))
  a = jnp.asarray(rng.standard_normal((4, 384)) * magnitudes, dtype)
  np.testing.assert_array_equal(np.asarray(jax.jit(unfused_copy)(a), np.float32),
                                np.asarray(a, np.float32))
  assert unfused_copy(a).dtype == dtype
