"""The real train and eval steps compiled by libtpu for TPU topologies, on this CPU host.

Each test builds the steps with train.platform="tpu" on compile-only TPU devices
(tests/tpu_util.py) and checks what the compiled program contains: the table's TPU
choices (bf16 compute, the Mosaic TPU Velvet kernel, the blocked MoE matmul, attention's
score buffer), the collectives of the mesh, and memory within the chip's HBM. Default
tier: one compile of a MoE with an expert axis over two slices (~50-70 s on 2 cores);
dense FSDP, a 4-host slice, v5p meshes and the MoE matmul comparison are `slow`. They
skip, saying why, without libtpu.
"""
import collections
import dataclasses
import re

import jax
import pytest

from tests import tpu_util
from tests.abstract_steps import abstract_steps
from vesperjax import sharding
from vesperjax.kernels import platform

SEQ = 96  # tpu_util.run_config's: no 128 block divides it, so attention is blocked
SPLASH_SEQ = 384  # 3 x 128 (splash attention), no other dimension of the tiny presets
_DCN = re.compile(r'_xla_megascale_transfer_type="(\w+)"')


def _kinds(text):
  return collections.Counter(c["kind"] for c in sharding.hlo_collectives(text))


def _check_tpu_program(compiled, *, generation, fused_velvet, seq=SEQ, training=True):
  """What every TPU step must show; returns the HLO text."""
  text = compiled.as_text()
  assert "bf16[" in text  # auto compute dtype: bf16 on an accelerator
  assert "optimization_barrier" not in text  # the CPU-only weight-gradient transpose
  kernel = "velvet_update_tpu" in text  # the Mosaic TPU Velvet kernel's op name
  assert kernel == fused_velvet
  if fused_velvet:
    assert tpu_util.custom_calls(text)[tpu_util.MOSAIC] >= 1
  # attention: splash (Mosaic, run per shard) where S is a multiple of 128, else blocked;
  # neither holds XLA attention's [S, S] scores
  assert platform.CHOICES["attention"]["tpu"][:2] == ("splash", "blocked")
  assert ("splash_mha_fwd" in text) == (seq % 128 == 0)
  assert ("splash_mha_dkv" in text) == (seq % 128 == 0 and training)
  assert not tpu_util.has_square_buffer(text, seq)
  m = compiled.memory_analysis()
  assert 0 < m.argument_size_in_bytes
  assert m.argument_size_in_bytes + m.temp_size_in_bytes < tpu_util.HBM_BYTES[generation]
  return text


def _check_moe(text):
  """The table's grouped matmul for TPU (blocked: batched matmuls of row blocks), not
  XLA's ragged_dot (whose grouped GEMMs show as ragged-dot Mosaic calls); experts
  dispatched by all-to-all."""
  assert platform.CHOICES["grouped_matmul"]["tpu"] == "blocked"
  assert "ragged-dot" not in text
  assert _kinds(text)["all-to-all"] > 0


@tpu_util.needs_tpu_compile
def test_two_slices_moe_with_the_data_axis_across_them():
  """tiny-moe on v5e:2x2 x 2 slices, data=2 x expert=4, fused Velvet, S = 384 (splash
  attention, per shard): each data row is one slice (DCN), the expert axis stays inside
  it (ICI); the compiled program is one slice's SPMD program whose cross-slice traffic
  is the data-parallel gradient all-reduce (libtpu's DCN transfers). The eval step
  compiles too."""
  run = tpu_util.run_config("tiny-moe", seq_len=SPLASH_SEQ, mesh__data=2, mesh__expert=4,
                            optim__fused=True)
  devs = tpu_util.devices("v5e:2x2", num_slices=2)
  mesh, built, _, _ = abstract_steps(run, devs)
  rows = [{d.slice_index for d in mesh.devices[i].flat} for i in range(2)]
  assert rows == [{0}, {1}], rows
  assert built.platform == "tpu"
  train, evaluate = tpu_util.compile_steps(run, devs)
  text = _check_tpu_program(train, generation="v5e", fused_velvet=True, seq=SPLASH_SEQ)
  assert "num_partitions=4" in text  # one slice's 4 chips; the other slice runs its twin
  _check_moe(text)
  dcn = collections.Counter(_DCN.findall(text))
  assert dcn["ALL_REDUCE"] > 0 and dcn["ALL_REDUCE"] > dcn["ALL_GATHER"], dcn
  _check_tpu_program(evaluate, generation="v5e", fused_velvet=False, seq=SPLASH_SEQ,
                     training=False)


@pytest.mark.slow
@tpu_util.needs_tpu_compile
def test_two_slices_dense_fsdp():
  """data=2 (DCN) x fsdp=4 (ICI): FSDP's weight all-gathers stay inside a slice."""
  run = tpu_util.run_config("tiny", mesh__data=2, mesh__fsdp=4, optim__fused=True)
  train, _ = tpu_util.compile_steps(run, tpu_util.devices("v5e:2x2", num_slices=2),
                                    evaluate=False)
  text = _check_tpu_program(train, generation="v5e", fused_velvet=True)
  assert "num_partitions=4" in text and _kinds(text)["all-gather"] > 0
  dcn = collections.Counter(_DCN.findall(text))
  assert dcn["ALL_REDUCE"] > dcn["ALL_GATHER"], dcn


@pytest.mark.slow
@tpu_util.needs_tpu_compile
def test_moe_with_an_expert_axis_on_v5p():
  run = tpu_util.run_config("tiny-moe", mesh__data=1, mesh__expert=4)
  train, _ = tpu_util.compile_steps(run, tpu_util.devices("v5p:2x2x1"), evaluate=False)
  text = _check_tpu_program(train, generation="v5p", fused_velvet=False)
  _check_moe(text)
  assert tpu_util.custom_calls(text)[tpu_util.MOSAIC] == 0  # no Pallas kernel asked for


@pytest.mark.slow
@tpu_util.needs_tpu_compile
def test_blocked_moe_does_less_work_than_ragged_dot_on_tpu():
  """The evidence for the TPU row inside the real step: XLA:TPU's ragged_dot computes
  the expert weights' gradient as a dense product over every expert (G x its FLOPs),
  blocked pads rows to blocks instead."""
  devs = tpu_util.devices("v5e:2x2")[:1]
  flops = {}
  for impl in ("blocked", "ragged_dot"):
    run = tpu_util.run_config("tiny-moe", mesh__data=1, model__moe_matmul=impl)
    train, _ = tpu_util.compile_steps(run, devs, evaluate=False)
    cost = train.cost_analysis()
    flops[impl] = (cost[0] if isinstance(cost, (list, tuple)) else cost)["flops"]
    assert ("ragged-dot" in train.as_text()) == (impl == "ragged_dot")
  assert flops["blocked"] < flops["ragged_dot"], flops


@pytest.mark.slow
@tpu_util.needs_tpu_compile
def test_dense_fsdp_on_one_v5e_host():
  run = tpu_util.run_config("tiny", mesh__data=2, mesh__fsdp=2, optim__fused=True)
  train, evaluate = tpu_util.compile_steps(run, tpu_util.devices("v5e:2x2"))
  text = _check_tpu_program(train, generation="v5e", fused_velvet=True)
  assert "num_partitions=4" in text and _kinds(text)["all-gather"] > 0
  _check_tpu_program(evaluate, generation="v5e", fused_velvet=False, training=False)


@pytest.mark.slow
@tpu_util.needs_tpu_compile
def test_one_slice_across_four_hosts():
  """v5e:4x4 is 4 hosts of 4 chips: one program over 16 chips of 4 processes."""
  devs = tpu_util.devices("v5e:4x4")
  assert len({d.process_index for d in devs}) == 4
  run = tpu_util.run_config("tiny", batch=16, mesh__data=4, mesh__fsdp=4,
                            optim__fused=True)
  train, _ = tpu_util.compile_steps(run, devs, evaluate=False)
  text = _check_tpu_program(train, generation="v5e", fused_velvet=True)
  assert "num_partitions=16" in text and _kinds(text)["all-gather"] > 0


@pytest.mark.slow
@tpu_util.needs_tpu_compile
def test_moe_data_and_expert_over_two_v5p_hosts():
  devs = tpu_util.devices("v5p:2x2x2")
  assert len({d.process_index for d in devs}) == 2
  run = tpu_util.run_config("tiny-moe", mesh__data=2, mesh__expert=4, optim__fused=True)
  train, evaluate = tpu_util.compile_steps(run, devs)
  text = _check_tpu_program(train, generation="v5p", fused_velvet=True)
  _check_moe(text)
  _check_tpu_program(evaluate, generation="v5p", fused_velvet=False, training=False)


@tpu_util.needs_tpu_compile
def test_attention_choice_has_no_square_scores_on_tpu():
  """The detector and the attention row on one v5e chip: XLA's attention holds the
  [S, S] scores; the TPU row's choices do not: splash (3 Mosaic kernels: forward, dq,
  dkv) at S = 384, blocked at S = 96, where no 128 block divides S."""
  from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
  from vesperjax.kernels import attention
  on = NamedSharding(Mesh(tpu_util.devices("v5e:2x2")[:1], ("x",)), P())

  def compiled(impl, seq):
    qkv = [jax.ShapeDtypeStruct((2, seq, 4, 64), jax.numpy.bfloat16, sharding=on)] * 3
    grad = jax.jit(jax.grad(lambda q, k, v: attention(
        q, k, v, implementation=impl).astype(jax.numpy.float32).sum(), argnums=(0, 1, 2)))
    with platform.use("tpu"):
      return tpu_util.compile_for_tpu(grad, *qkv).as_text()

  assert tpu_util.has_square_buffer(compiled("xla", SEQ), SEQ)
  assert platform.CHOICES["attention"]["tpu"][:2] == ("splash", "blocked")
  text = compiled(None, SEQ)  # auto: blocked at 96
  assert not tpu_util.has_square_buffer(text, SEQ) and tpu_util.MOSAIC not in text
  text = compiled(None, SPLASH_SEQ)  # auto: splash
  assert not tpu_util.has_square_buffer(text, SPLASH_SEQ)
  assert tpu_util.custom_calls(text)[tpu_util.MOSAIC] == 3 and "splash_mha_dkv" in text


# -- the multi-slice mesh (vesperjax.sharding.make_mesh) --------------------------------

@tpu_util.needs_tpu_compile
def test_mesh_over_slices_from_topology():
  devs = tpu_util.devices("v5e:2x2", num_slices=2)
  assert sharding.slice_count(devs) == 2
  assert sharding.slice_count(tpu_util.devices("v5e:2x2")) == 1
  mesh = sharding.make_mesh(fsdp=4, devices=devs)  # data=-1 takes the 2 slices
  assert dict(mesh.shape)["data"] == 2
  for i in range(2):
    assert {d.slice_index for d in mesh.devices[i].flat} == {i}
  mesh = sharding.make_mesh(data=4, fsdp=2, devices=devs)  # 2 data rows per slice
  assert [{d.slice_index for d in mesh.devices[i].flat} for i in range(4)] == [
      {0}, {0}, {1}, {1}]
  with pytest.raises(ValueError, match="multiple of 2"):
    sharding.make_mesh(data=1, fsdp=8, devices=devs)


@dataclasses.dataclass(frozen=True)
class _Device:
  """A stand-in device of a multi-slice job without coordinates, which the topology
  search cannot place (it takes the fallback layout)."""
  id: int
  slice_index: int
  process_index: int
  platform: str = "tpu"


@pytest.mark.parametrize("slices", [2, 3])
def test_mesh_over_slices_fallback_layout(slices):
  """Slice-major by id: the data axis still crosses slices and nothing else does. Runs
  without libtpu."""
  fake = [_Device(i, i // 4, i // 4) for i in reversed(range(4 * slices))]
  mesh = sharding.make_mesh(data=2 * slices, fsdp=2, devices=fake)
  assert dict(mesh.shape) == dict(data=2 * slices, fsdp=2, expert=1, tensor=1)
  for i in range(2 * slices):
    assert {d.slice_index for d in mesh.devices[i].flat} == {i // 2}
  assert sharding.slice_count(fake) == slices
  gpus = [dataclasses.replace(d, platform="gpu") for d in fake]  # not a DCN boundary
  assert sharding.slice_count(gpus) == 1
  last = slices - 1  # two devices moved from slice 0 to the last slice
  uneven = fake[:-2] + [_Device(100, last, last), _Device(101, last, last)]
  with pytest.raises(ValueError, match="different numbers of devices"):
    sharding.make_mesh(data=2 * slices, fsdp=2, devices=uneven)
  with pytest.raises(ValueError, match=f"multiple of {slices}"):
    sharding.make_mesh(data=1, fsdp=4 * slices, devices=fake)
