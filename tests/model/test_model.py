"""GeneMamba model: parameter counts, bidirectional padding invariance, dtypes, axis names."""

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from genemamba_jax.model import GeneMamba, GeneMambaConfig, count_params
from genemamba_jax.model.bimamba import reverse_valid_index, take_positions
from genemamba_jax.model.genemamba import cell_embedding
from tests.conftest import fast_first

jax.config.update("jax_default_matmul_precision", "highest")


@pytest.mark.parametrize("layers, d, exact, millions", [
    (24, 512, 65_744_338, 65.74), (48, 512, 105_426_514, 105.42),
    (24, 768, 127_055_122, 127.05), (48, 768, 215_029_714, 215.03)])
def test_count_params_matches_paper_table5(layers, d, exact, millions):
  config = GeneMambaConfig(n_layers=layers, d_model=d, mixer="mamba2", d_state=64, headdim=64,
                           combine="mean", vocab_size=25_426)
  assert count_params(config) == exact
  # The paper's four figures are these counts rounded to 0.01M once the three
  # per-head SSM scalars of each layer (A_log, D, dt_bias: 3 * nheads) are left
  # out; with them, two round one digit higher (105.43M, 127.06M).
  assert round((exact - layers * 3 * config.nheads) / 1e6, 2) == millions


@pytest.mark.slow  # over ~5 s on 2 cores
def test_count_params_of_the_original_layer_and_equals_allocated():
  base = GeneMambaConfig(n_layers=1)
  # One Mamba-2 layer at d=512 has 1,653,424 parameters (the original's layer).
  assert count_params(base.replace(n_layers=2)) - count_params(base) == 1_653_424
  small = GeneMambaConfig(vocab_size=50, d_model=32, n_layers=3, mixer="mamba1", combine="gate")
  model = GeneMamba(small, rngs=nnx.Rngs(0))
  allocated = sum(x.size for x in jax.tree.leaves(nnx.state(model, nnx.Param)))
  assert count_params(small) == allocated
  # gate weights: one Linear(2d, d) per layer, or one in all (the original).
  shared = count_params(small.replace(shared_combine=True))
  assert count_params(small) - shared == 2 * (2 * 32 * 32 + 32)


def test_reverse_valid_index_reverses_only_valid_tokens():
  mask = jnp.array([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1], [1, 0, 0, 0, 0]], bool)
  index = reverse_valid_index(mask)
  assert index.tolist() == [[2, 1, 0, 3, 4], [4, 3, 2, 1, 0], [0, 1, 2, 3, 4]]
  x = jnp.arange(15.0).reshape(3, 5)
  np.testing.assert_array_equal(take_positions(take_positions(x, index), index), x)


def _small(**kw):
  base = dict(vocab_size=40, d_model=32, n_layers=2, d_state=8, headdim=16, expand=2,
              scan_backend="sequential")
  base.update(kw)
  return GeneMambaConfig(**base)


@fast_first("mixer", ["mamba2", "mamba1"])
@fast_first("combine, shared", [("mean", False), ("sum", False), ("concat", False),
                                ("gate", False), ("gate", True)])
def test_padding_invariance(mixer, combine, shared):
  config = _small(mixer=mixer, combine=combine, shared_combine=shared, prenorm=combine == "sum")
  model = GeneMamba(config, rngs=nnx.Rngs(1))
  rng = np.random.default_rng(0)
  lengths = [50, 64, 23]
  outs = {}
  for width in (64, 200):
    tokens = np.zeros((3, width), np.int32)
    for i, n in enumerate(lengths):
      tokens[i, :n] = np.random.default_rng(i).integers(4, 40, n)
    # Garbage after the valid tokens must not matter either: fill padding with real ids.
    mask = np.arange(width)[None, :] < np.array(lengths)[:, None]
    noisy = np.where(mask, tokens, rng.integers(4, 40, tokens.shape))
    outs[width] = model(jnp.asarray(noisy), jnp.asarray(mask))
  for i, n in enumerate(lengths):
    np.testing.assert_allclose(outs[64].hidden[i, :n], outs[200].hidden[i, :n], atol=1e-5, rtol=0)
    np.testing.assert_allclose(outs[64].logits[i, :n], outs[200].logits[i, :n], atol=1e-5, rtol=0)


def test_both_directions_are_used():
  """Changing the last valid token changes the first position's output (reverse stream)."""
  model = GeneMamba(_small(), rngs=nnx.Rngs(0))
  tokens = jnp.array([[5, 6, 7, 8, 9, 0]])
  other = tokens.at[0, 4].set(10)
  a, b = model(tokens).hidden, model(other).hidden
  assert float(jnp.abs(a[0, 0] - b[0, 0]).max()) > 1e-4
  mean = cell_embedding(a, tokens != 0, "mean")
  np.testing.assert_allclose(mean[0], a[0, :5].mean(axis=0), atol=1e-6)
  np.testing.assert_array_equal(cell_embedding(a, tokens != 0, "cls"), a[:, 0])


@pytest.mark.slow  # over ~5 s on 2 cores
@pytest.mark.parametrize("mixer", ["mamba2", "mamba1"])
def test_bf16_compute_matches_fp32(mixer):
  config = _small(mixer=mixer, n_layers=2, scan_backend="associative")
  model32 = GeneMamba(config, rngs=nnx.Rngs(3))
  model16 = GeneMamba(config.replace(dtype="bfloat16"), rngs=nnx.Rngs(3))
  # L = 48 so that no activation shape collides with the state's [.., d_inner=64, N=8].
  tokens = jnp.asarray(np.random.default_rng(0).integers(4, 40, (2, 48)), jnp.int32)
  h32, h16 = model32(tokens).hidden, model16(tokens).hidden
  assert all(p.dtype == jnp.float32 for p in jax.tree.leaves(nnx.state(model16, nnx.Param)))
  # bf16 keeps 8 mantissa bits (relative rounding 2^-9 ~ 0.2% per op); through two
  # layers of projections and the normalized output (values O(1)) the error stays
  # within a few percent of the output scale, never the O(1) error of a broken scan.
  scale = float(jnp.abs(h32).max())
  assert float(jnp.abs(h32 - h16).max()) < 0.05 * scale
  # No bf16 scan state: no bf16 value in the traced program has the state's
  # trailing dims ([.., d_inner, N] for Mamba-1, [.., heads, headdim, N] for Mamba-2).
  graphdef, state = nnx.split(model16)
  jaxpr = str(jax.make_jaxpr(lambda s, t: nnx.merge(graphdef, s)(t).hidden)(state, tokens))
  state_dims = ((config.d_inner, config.state_size) if mixer == "mamba1"
                else (config.nheads, config.headdim, config.state_size))
  bf16_shapes = {tuple(int(d) for d in m.split(",") if d)
                 for m in re.findall(r"bf16\[([\d,]*)\]", jaxpr)}
  assert bf16_shapes, "the bf16 model should compute in bf16 somewhere"
  assert not [s for s in bf16_shapes if s[-len(state_dims):] == state_dims], bf16_shapes
  f32_state = [m for m in re.findall(r"f32\[([\d,]*)\]", jaxpr)
               if tuple(int(d) for d in m.split(",") if d)[-len(state_dims):] == state_dims]
  assert f32_state, "the scan state should appear, in float32"


@pytest.mark.slow  # over ~5 s on 2 cores
def test_every_parameter_has_logical_axis_names():
  for mixer in ("mamba1", "mamba2"):
    model = GeneMamba(_small(mixer=mixer, combine="gate", prenorm=True), rngs=nnx.Rngs(0))
    for path, var in nnx.to_flat_state(nnx.state(model, nnx.Param)):
      names = var.get_metadata().get("out_sharding")
      assert names is not None and len(names) == var[...].ndim, (path, names)
      if path[0] == "layers":
        assert names[0] == "layers", path


@pytest.mark.slow  # over ~10 s on 2 cores
def test_scan_backends_agree_on_the_model():
  tokens = jnp.asarray(np.random.default_rng(0).integers(4, 40, (2, 70)), jnp.int32)
  for mixer in ("mamba1", "mamba2"):
    outs = [GeneMamba(_small(mixer=mixer, scan_backend=b, scan_chunk_size=16), rngs=nnx.Rngs(0))(
        tokens).logits for b in ("sequential", "associative", "chunked")]
    for out in outs[1:]:
      np.testing.assert_allclose(out, outs[0], atol=1e-4, rtol=0)


@pytest.mark.slow  # over ~10 s on 2 cores
def test_remat_and_tied_embeddings_run_and_differentiate():
  config = _small(remat=True, tie_embeddings=True)
  model = GeneMamba(config, rngs=nnx.Rngs(0))
  tokens = jnp.asarray(np.random.default_rng(0).integers(4, 40, (2, 16)), jnp.int32)

  def loss(model):
    return jnp.mean(model(tokens).logits ** 2)

  grads = nnx.grad(loss)(model)
  assert all(bool(jnp.all(jnp.isfinite(g))) for g in jax.tree.leaves(nnx.state(grads)))
  assert model.lm_head is None and model(tokens).logits.shape == (2, 16, 40)


@pytest.mark.slow  # over ~10 s on 2 cores
@pytest.mark.parametrize("mixer", ["mamba1", "mamba2"])
def test_remat_policies_change_memory_not_the_gradients(mixer):
  """Every remat policy (the default keeps only the mixers' in_proj and scan outputs) gives
  the loss and gradients of the model that keeps everything."""
  tokens = jnp.asarray(np.random.default_rng(0).integers(4, 40, (2, 24)), jnp.int32)
  base = _small(mixer=mixer, n_layers=2, streams="separate", scan_backend="chunked",
                scan_chunk_size=8)
  assert GeneMambaConfig().remat and GeneMambaConfig().remat_policy == "in_proj_and_scan_saveable"
  results = {}
  for name, config in [("none", base.replace(remat=False)),
                       *[(p, base.replace(remat=True, remat_policy=p))
                         for p in ("in_proj_and_scan_saveable", "nothing_saveable",
                                   "dots_saveable")]]:
    model = GeneMamba(config, rngs=nnx.Rngs(0))
    loss = lambda m: jnp.mean(m(tokens).logits ** 2)
    value, grads = nnx.jit(nnx.value_and_grad(loss))(model)
    results[name] = (value, jax.tree.leaves(nnx.state(grads, nnx.Param)))
  v0, g0 = results.pop("none")
  for name, (value, grads) in results.items():
    np.testing.assert_allclose(value, v0, rtol=1e-6, err_msg=name)
    for a, b in zip(g0, grads, strict=True):
      np.testing.assert_allclose(b, a, rtol=1e-5, atol=1e-7, err_msg=name)


def test_bad_config_is_refused():
  with pytest.raises(ValueError, match="combine='max'"):
    GeneMambaConfig(combine="max")
  with pytest.raises(ValueError, match="not a multiple of headdim"):
    GeneMambaConfig(d_model=48, headdim=64)
