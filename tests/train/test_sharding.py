"""genemamba_jax.train.sharding: mesh, logical rules, shardings, the real step on 8 devices."""

import json
import os
import subprocess
import sys
from pathlib import Path

import jax
import ml_collections
import pytest
from flax import nnx
from jax.sharding import AbstractMesh, AxisType
from jax.sharding import PartitionSpec as P

from genemamba_jax.train import config as train_config
from genemamba_jax.model import GeneMamba, GeneMambaConfig
from genemamba_jax.model.layers import AXIS_NAMES
from genemamba_jax.train import optimizer, sharding
from genemamba_jax.train import state as state_lib

ROOT = Path(__file__).resolve().parents[2]


def _mesh_cfg(**sizes):
  return ml_collections.ConfigDict(dict(data=sizes.get("data", 1), fsdp=sizes.get("fsdp", 1),
                                        tensor=sizes.get("tensor", 1)))


def _abstract_mesh(data=1, fsdp=1, tensor=1):
  return AbstractMesh((data, fsdp, tensor), sharding.MESH_AXES, axis_types=(AxisType.Auto,) * 3)


def test_mesh_shape_resolves_the_rest_and_checks_the_count():
  assert sharding.mesh_shape(_mesh_cfg(data=-1, tensor=2), 8) == (4, 1, 2)
  assert sharding.mesh_shape(_mesh_cfg(data=2, fsdp=2, tensor=2), 8) == (2, 2, 2)
  with pytest.raises(ValueError, match=r"data=2, fsdp=2, tensor=1 needs 4 devices, but there "
                                       r"are 8 \(jax.device_count\(\)\)"):
    sharding.mesh_shape(_mesh_cfg(data=2, fsdp=2), 8)
  with pytest.raises(ValueError, match="8 devices are not a multiple of 3"):
    sharding.mesh_shape(_mesh_cfg(data=-1, fsdp=3), 8)
  with pytest.raises(ValueError, match="at most one -1"):
    sharding.mesh_shape(_mesh_cfg(data=-1, fsdp=-1), 8)
  with pytest.raises(ValueError, match="sizes must be >= 1"):
    sharding.mesh_shape(_mesh_cfg(tensor=0), 8)


def test_make_mesh_on_this_host():
  mesh = sharding.make_mesh(train_config.default_config().mesh)
  assert mesh.axis_names == sharding.MESH_AXES
  assert mesh.devices.size == jax.device_count()
  assert all(t == AxisType.Auto for t in mesh.axis_types)
  with pytest.raises(ValueError, match=f"needs {2 * jax.device_count()} devices"):
    sharding.make_mesh(_mesh_cfg(data=2 * jax.device_count()))


def test_every_model_axis_name_has_a_rule():
  ruled = {name for name, _ in sharding.LOGICAL_RULES}
  assert set(AXIS_NAMES) | {"layers", "embed_pair"} <= ruled


@pytest.mark.parametrize("names, shape, mesh, want", [
    # The Mamba in_proj: FSDP on embed, tensor parallel on inner.
    (("layers", "embed", "inner"), (24, 512, 2192), dict(data=2, fsdp=2, tensor=2),
     P(None, "fsdp", "tensor")),
    # Not divisible: 25,426 vocab rows over tensor=4 stay whole; embed still splits.
    (("vocab", "embed"), (25426, 512), dict(fsdp=8, tensor=4), P(None, "fsdp")),
    (("embed", "vocab"), (12, 42), dict(fsdp=8, tensor=2), P(None, "tensor")),
    # Combine's [2d, d] kernel: fsdp goes to "embed" first, else to "embed_pair".
    (("layers", "embed_pair", "embed"), (2, 32, 16), dict(fsdp=8), P(None, None, "fsdp")),
    (("layers", "embed_pair", "embed"), (2, 24, 12), dict(fsdp=8), P(None, "fsdp", None)),
    # Never split: None names, small dims, names without a rule.
    (("layers", "conv_kernel", None, "inner"), (2, 4, 1, 48), dict(tensor=2),
     P(None, None, None, "tensor")),
    (("inner", "state"), (64, 16), dict(fsdp=2, tensor=2), P("tensor", None)),
    (("unknown",), (8,), dict(fsdp=8), P(None)),
])
def test_logical_to_spec(names, shape, mesh, want):
  assert sharding.logical_to_spec(names, shape, _abstract_mesh(**mesh)) == want


def test_logical_to_spec_rule_variants_and_errors():
  mesh = _abstract_mesh(data=2, fsdp=2, tensor=2)
  rules = (("vocab", ("fsdp", "tensor")), ("vocab", "tensor"), ("embed", "fsdp"))
  # A tuple of mesh axes splits one dim over both; fallback to the next rule.
  assert sharding.logical_to_spec(("vocab", "embed"), (8, 6), mesh, rules) == P(
      ("fsdp", "tensor"), None)
  assert sharding.logical_to_spec(("vocab", "embed"), (6, 6), mesh, rules) == P("tensor", "fsdp")
  with pytest.raises(ValueError, match="mesh axes \\['model'\\] not in the mesh"):
    sharding.logical_to_spec(("embed",), (8,), mesh, (("embed", "model"),))
  with pytest.raises(ValueError, match="do not match shape"):
    sharding.logical_to_spec(("embed",), (8, 8), mesh)


@pytest.mark.parametrize("mixer", ["mamba1", "mamba2"])
def test_state_shardings_of_a_real_train_state(mixer):
  config = GeneMambaConfig(vocab_size=40, d_model=16, n_layers=2, mixer=mixer, headdim=8,
                           combine="gate")
  tx = optimizer.make_optimizer(train_config.default_config().optimizer, 100)
  abstract = jax.eval_shape(lambda: state_lib.init_state(GeneMamba(config, rngs=nnx.Rngs(0)), tx, 0))
  mesh = _abstract_mesh(data=2, fsdp=2, tensor=2)
  shardings = sharding.state_shardings(abstract, mesh)
  assert jax.tree.structure(shardings) == jax.tree.structure(abstract)
  specs = {jax.tree_util.keystr(p, simple=True, separator="/"): s.spec
           for p, s in jax.tree_util.tree_leaves_with_path(shardings)}
  mixer_param = lambda name: specs[f"params/layers/mixer/{name}/value"]
  assert mixer_param("in_proj/kernel") == P(None, "fsdp", "tensor")
  assert mixer_param("out_proj/kernel") == P(None, "tensor", "fsdp")
  assert specs["params/embeddings/embedding/value"] == P("tensor", "fsdp")
  assert specs["step"] == specs["rng"] == P()
  # Adam's moments (mu, nu) mirror the params: same layout; its count is replicated.
  moments = [k for k in specs if k.startswith("opt_state") and "in_proj/kernel" in k]
  assert len(moments) == 2 and all(specs[k] == P(None, "fsdp", "tensor") for k in moments)
  assert specs["opt_state/1/0/count"] == P()
  if mixer == "mamba1":
    assert mixer_param("A_log") == P(None, "tensor", None)
    assert mixer_param("x_proj/kernel") == P(None, "tensor", None)
    assert mixer_param("dt_proj/kernel") == P(None, None, "tensor")
  else:
    assert mixer_param("dt_bias") == P(None, "tensor")


def test_batch_sharding():
  mesh = sharding.make_mesh(train_config.default_config().mesh)
  assert sharding.batch_sharding(mesh).spec == P(("data", "fsdp"))


@pytest.fixture(scope="module")
def eight_devices():
  """tests/train/sharding_check.py's JSON, run with 8 host devices (its own process)."""
  # -O0 codegen compiles ~30% faster; both sides of every comparison use it.
  flags = ("--xla_force_host_platform_device_count=8 --xla_backend_optimization_level=0 "
           "--xla_llvm_disable_expensive_passes=true")
  env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS=flags,
             PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]))
  proc = subprocess.run([sys.executable, str(ROOT / "tests" / "train" / "sharding_check.py")], env=env,
                        capture_output=True, text=True, timeout=300, check=False)
  assert proc.returncode == 0, proc.stderr[-3000:]
  return json.loads(proc.stdout.strip().splitlines()[-1])


@pytest.mark.slow  # over ~10 s on 2 cores
@pytest.mark.parametrize("mesh", ["data8", "fsdp8", "data2_fsdp2_tensor2"])
def test_sharded_step_equals_one_device(eight_devices, mesh):
  result = eight_devices["meshes"][mesh]
  # float32 sums in another order: the loss (~3.7) to 1e-5, parameters to
  # 1e-6, a thousandth of the step's size (lr 1e-3: Adam's first update).
  assert result["loss_diff"] < 1e-5
  assert eight_devices["step_size"] > 5e-4
  worst = max(result["param_diff"], key=result["param_diff"].get)
  assert result["param_diff"][worst] < 1e-6, (worst, result["param_diff"][worst])
  assert len(result["param_diff"]) == 12


@pytest.mark.slow  # over ~10 s on 2 cores
def test_sharded_layouts(eight_devices):
  """The parameters really were split (per-device shard shapes), with the fallback."""
  layout = {mesh: r["layout"] for mesh, r in eight_devices["meshes"].items()}
  assert layout["data8"]["layers/mixer/in_proj/kernel"] == ["P(None, 'fsdp', 'tensor')",
                                                            [2, 16, 84]]
  assert layout["fsdp8"]["layers/mixer/in_proj/kernel"][1] == [2, 2, 84]
  assert layout["fsdp8"]["embeddings/embedding"][1] == [41, 2]
  tp = layout["data2_fsdp2_tensor2"]
  assert tp["layers/mixer/in_proj/kernel"][1] == [2, 8, 42]
  assert tp["layers/mixer/conv1d/kernel"][1] == [2, 4, 1, 24]
  # 41 vocabulary rows do not split over tensor = 2: replicated on that dim.
  assert tp["embeddings/embedding"] == ["P(None, 'fsdp')", [41, 8]]
  assert tp["lm_head/kernel"] == ["P('fsdp', None)", [8, 41]]
