"""vesperjax.sharding: mesh, logical rules, state/batch shardings, mesh equivalence of a
sharded adamw step, HLO collectives, resharding a state onto another mesh."""
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec as P

from tests import sharding_train as st
from vesperjax import sharding as sh
from vesperjax.model.transformer import VesperLM

STEPS = 2


def test_make_mesh_sizes_rest_and_errors():
  assert dict(sh.make_mesh().shape) == dict(data=8, fsdp=1, expert=1, tensor=1)
  assert dict(sh.make_mesh(fsdp=-1, tensor=2).shape) == dict(data=1, fsdp=4, expert=1,
                                                            tensor=2)
  mesh = sh.make_mesh(data=2, expert=4)
  assert mesh.axis_names == sh.AXES
  assert all(t == jax.sharding.AxisType.Auto for t in mesh.axis_types)
  with pytest.raises(ValueError, match="data=3"):
    sh.make_mesh(data=3)
  with pytest.raises(ValueError, match="at most one"):
    sh.make_mesh(fsdp=-1, tensor=-1)
  with pytest.raises(ValueError, match="mesh.tensor=-1"):
    sh.make_mesh(data=3, tensor=-1)
  assert dict(sh.make_mesh(devices=jax.devices()[:1]).shape)["data"] == 1


def test_logical_to_spec_rules_and_divisibility():
  mesh = sh.make_mesh(fsdp=2, expert=2, tensor=2)
  assert sh.logical_to_spec(("layers", "expert", "embed", "mlp"), (2, 4, 32, 64),
                            mesh) == P(None, "expert", "fsdp", "tensor")
  # 3 experts / 5 hidden do not divide by 2: those dimensions stay replicated
  assert sh.logical_to_spec(("expert", "embed", "mlp"), (3, 5, 64), mesh) == P(
      None, None, "tensor")
  assert sh.logical_to_spec(("batch", None), (8, 12), mesh) == P(("fsdp", "expert"))
  # longest dividing prefix of the batch axes; size-1 axes never appear
  assert sh.logical_to_spec(("batch",), (2,), mesh) == P("fsdp")
  assert sh.logical_to_spec(("vocab", "embed"), (128, 32),
                            sh.make_mesh(data=8)) == P()
  with pytest.raises(ValueError, match="do not match"):
    sh.logical_to_spec(("embed",), (2, 3), mesh)


def test_batch_sharding_and_global_batch():
  mesh = sh.make_mesh(data=2, fsdp=2, tensor=2)
  assert sh.batch_sharding(mesh).spec == P(("data", "fsdp"), None)
  assert sh.batch_sharding(mesh, leading=1).spec == P(None, ("data", "fsdp"), None)
  assert sh.batch_divisor(mesh) == 4
  host = np.arange(8 * 12, dtype=np.int32).reshape(8, 12)
  arr = sh.global_batch_from_host(host, mesh)
  assert arr.shape == (8, 12) and arr.sharding.spec == P(("data", "fsdp"), None)
  np.testing.assert_array_equal(np.asarray(arr), host)


def _model_and_optimizer(moe: bool):
  model = VesperLM(st.tiny_config(moe), rngs=nnx.Rngs(0))
  return model, nnx.Optimizer(model, optax.adamw(1e-3), wrt=nnx.Param)


def _variables(tree):
  leaves = jax.tree.leaves_with_path(tree, is_leaf=lambda x: isinstance(x, nnx.Variable))
  return [(jax.tree_util.keystr(p), v) for p, v in leaves]


def test_every_leaf_follows_the_rules():
  """Params, optimizer mu/nu, FlyLoRA's frozen A and routing bias all land where the
  rules say; step counters replicated; and the rules really shard things."""
  mesh = sh.make_mesh(fsdp=2, expert=2, tensor=2)
  state = nnx.state(_model_and_optimizer(True))
  placed = sh.shard_state(state, mesh)
  specs = {}
  for path, v in _variables(placed):
    meta = v.get_metadata().get("out_sharding")
    want = P() if meta is None else sh.logical_to_spec(meta, v.shape, mesh)
    assert v[...].sharding.spec == want, path
    specs[path] = want
  get = lambda suffix: [s for p, s in specs.items() if p.endswith(suffix)]
  assert set(get("['gate']['kernel']")) == {P(None, "expert", "fsdp", "tensor")}
  assert len(get("['gate']['kernel']")) == 3  # param, mu, nu
  assert get("['gate']['lora_a']") == [P(None, "expert", "fsdp")]
  assert get("['gate']['routing_bias']") == [P(None, "expert")]
  assert set(get("['embed']")) == {P("tensor", "fsdp")}
  assert set(get("['qkv_kernel']")) == {P(None, "fsdp", None, "tensor")}
  assert set(get("['count']")) == {P()}


def test_state_shardings_keeps_tree_and_handles_abstract_state():
  mesh = sh.make_mesh(fsdp=8)
  abstract = nnx.state(nnx.eval_shape(lambda: _model_and_optimizer(False)))
  shardings = sh.state_shardings(abstract, mesh)
  assert jax.tree.structure(shardings) == jax.tree.structure(abstract)
  assert all(isinstance(s, NamedSharding) for s in jax.tree.leaves(shardings))
  assert sh.state_shardings({"step": jnp.zeros(())}, mesh)["step"].spec == P()


# ------------------------------------------------------------------ mesh equivalence

_REFERENCE = {}


def _reference(moe: bool):
  if moe not in _REFERENCE:
    mesh = sh.make_mesh(devices=jax.devices()[:1])
    _REFERENCE[moe] = st.train(st.tiny_config(moe), mesh, STEPS)[0]
  return _REFERENCE[moe]


def _layer_activation_gathers(hlo: str) -> list[dict]:
  """All-gathers of float arrays shaped like the batch ([B, S, ...] or [tokens, ...]).

  (The int32 token ids gathered once for the embedding lookup are not counted.)"""
  b, s = st.BATCH, st.SEQ
  act = lambda shape: shape[:2] == (b, s) or (shape and shape[0] in (b * s, 2 * b * s))
  return [c for c in sh.hlo_collectives(hlo) if c["kind"] == "all-gather"
          and any(act(x) and t.startswith(("f", "bf")) for x, t in zip(c["shapes"],
                                                                       c["dtypes"]))]


def _check_equivalent(moe: bool, mesh_axes: dict):
  mesh = sh.make_mesh(**mesh_axes)
  losses, state, hlo = st.train(st.tiny_config(moe), mesh, STEPS, hlo=True)
  np.testing.assert_allclose(losses, _reference(moe), rtol=2e-5, atol=2e-5)
  checked = 0
  for path, v in _variables(state):  # the step's outputs stay sharded by the rules
    if isinstance(v, nnx.Variable):
      meta = v.get_metadata().get("out_sharding")
      want = P() if meta is None else sh.logical_to_spec(meta, v.shape, mesh)
      v, checked = v[...], checked + 1
    else:  # step counters, RNG key data, optimizer counts: replicated
      want = P()
    assert v.sharding.spec == want, path
  assert checked > 0
  return hlo


def test_moe_expert_parallel_step_matches_single_device():
  hlo = _check_equivalent(True, dict(data=2, expert=4))
  kinds = [c["kind"] for c in sh.hlo_collectives(hlo)]
  assert kinds.count("all-to-all") >= 4  # dispatch + return, forward and backward
  assert _layer_activation_gathers(hlo) == []


def test_dense_fsdp_step_matches_single_device():
  _check_equivalent(False, dict(fsdp=8))


def test_dense_fsdp_step_gathers_weights_not_activations():
  mesh = sh.make_mesh(fsdp=8)
  hlo = st.train(st.tiny_config(False), mesh, 1, hlo=True)[2]
  assert _layer_activation_gathers(hlo) == []


@pytest.mark.slow
@pytest.mark.parametrize("moe,axes", [
    (False, dict(data=8)), (False, dict(data=2, expert=4)),
    (False, dict(tensor=2, data=4)), (True, dict(data=8)), (True, dict(fsdp=8)),
    (True, dict(tensor=2, data=4)), (True, dict(fsdp=2, expert=2, tensor=2))])
def test_step_matches_single_device_on_more_meshes(moe, axes):
  _check_equivalent(moe, axes)


# ------------------------------------------------------------------ resharding

def test_state_moves_between_mesh_shapes():
  """Checkpoint-style restore: a state sharded on 8 devices placed onto 1 device and
  onto another 8-device layout keeps every value."""
  state = nnx.state(_model_and_optimizer(True))
  big = sh.shard_state(state, sh.make_mesh(fsdp=2, expert=2, tensor=2))
  for mesh in (sh.make_mesh(devices=jax.devices()[:1]), sh.make_mesh(data=2, expert=4)):
    moved = jax.device_put(big, sh.state_shardings(big, mesh))
    for (path, a), (_, b) in zip(_variables(state), _variables(moved)):
      assert b[...].sharding.mesh.shape == mesh.shape, path
      np.testing.assert_array_equal(np.asarray(a[...]), np.asarray(b[...]), err_msg=path)
