"""Device mesh, logical-axis rules and state/batch shardings.

The model names each parameter dimension with a logical axis (`layers.annotated`); this
module maps those names to the four mesh axes below, so the model never mentions a mesh.

Mesh axes:
  data    pure data parallelism (parameters replicated, batch split)
  fsdp    batch split and parameters/optimizer state sharded on their `embed` dimension
          (ZeRO-3 style: XLA all-gathers a layer's weights when it needs them)
  expert  MoE experts split across devices (expert parallelism); also splits the batch,
          so dense layers treat it as one more data-parallel axis
  tensor  Megatron-style tensor parallelism of heads, FFN width and vocabulary

A rule is dropped for a dimension its mesh axes do not divide, so any model runs (with
less sharding) on any mesh.

Multi-slice TPU (devices with several `slice_index` values): the data axis spans the
slices (DCN) and every other axis stays inside one slice (ICI), as
`mesh_utils.create_hybrid_device_mesh` lays them out; `mesh.data` must then be a
multiple of the number of slices.
"""
from __future__ import annotations

import math
import re
from collections.abc import Sequence

import jax
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec as P


AXES = ("data", "fsdp", "expert", "tensor")

# Logical axis -> mesh axis (or tuple of mesh axes, major to minor). Not listed: None.
#   vocab -> tensor: the tied embedding / LM head is split over vocabulary, so the
#     [tokens, vocab] logits are produced (and reduced by the loss) vocab-sharded.
#   embed -> fsdp: the FSDP axis shards every weight on its model dimension.
#   layers, norm, head_dim -> replicated: the scanned layer axis is walked one layer at
#     a time, norms are tiny, and head_dim is too small to split usefully.
LOGICAL_RULES: dict[str, str | tuple[str, ...] | None] = {
    "batch": ("data", "fsdp", "expert"),
    "vocab": "tensor",
    "embed": "fsdp",
    "mlp": "tensor",
    "heads": "tensor",
    "head_dim": None,
    "expert": "expert",
    "layers": None,
    "norm": None,
}


def make_mesh(data: int = -1, fsdp: int = 1, expert: int = 1, tensor: int = 1, *,
              devices: Sequence[jax.Device] | None = None) -> Mesh:
  """A (data, fsdp, expert, tensor) mesh with Auto axis types; -1 takes the rest.

  `data` defaults to -1 but becomes 1 when another axis is -1 (`make_mesh(fsdp=-1)`).

  Auto (not jax.make_mesh's default Explicit) lets jit propagate shardings from the
  inputs, which is what the logical rules rely on.
  """
  devices = list(jax.devices() if devices is None else devices)
  sizes = dict(zip(AXES, (data, fsdp, expert, tensor)))
  rest = [a for a, s in sizes.items() if s == -1]
  if len(rest) == 2 and rest[0] == "data":  # data's default -1 yields to another -1
    sizes["data"], rest = 1, rest[1:]
  if len(rest) > 1:
    raise ValueError(f"mesh: at most one axis may be -1, got {', '.join(rest)}")
  for a, s in sizes.items():
    if not (isinstance(s, int) and (s >= 1 or s == -1)):
      raise ValueError(f"mesh.{a}={s!r}: must be a positive integer or -1")
  known = math.prod(s for s in sizes.values() if s != -1)
  if rest:
    if len(devices) % known:
      raise ValueError(f"mesh.{rest[0]}=-1: {len(devices)} devices are not divisible by "
                       f"the other axes' product {known}")
    sizes[rest[0]] = len(devices) // known
  if math.prod(sizes.values()) != len(devices):
    shape = " x ".join(f"{a}={s}" for a, s in sizes.items())
    raise ValueError(f"mesh: {shape} = {math.prod(sizes.values())} devices, but "
                     f"{len(devices)} are available")
  shape = tuple(sizes.values())
  slices = slice_count(devices)
  if slices > 1:
    grid = _multi_slice_grid(shape, devices, slices)
  else:
    try:  # topology-aware device order on real hardware
      from jax.experimental import mesh_utils
      grid = mesh_utils.create_device_mesh(shape, devices)
    except Exception:  # noqa: BLE001  (CPU, odd shapes): plain order is fine there
      grid = np.asarray(devices, dtype=object).reshape(shape)
  return Mesh(grid, AXES, axis_types=(AxisType.Auto,) * len(AXES))


def slice_count(devices: Sequence[jax.Device]) -> int:
  """How many TPU slices `devices` span (1 for devices without a `slice_index`, and
  off TPU: a GPU's slice_index, where jax sets one, is no DCN boundary of ours)."""
  return len({getattr(d, "slice_index", 0) if getattr(d, "platform", "tpu") == "tpu"
              else 0 for d in devices})


def _multi_slice_grid(shape: tuple[int, ...], devices, slices: int) -> np.ndarray:
  """A device grid of `shape` whose data axis crosses slices (DCN) slice-major and
  whose other axes stay within a slice (ICI): only the data axis's gradient all-reduce
  then travels between slices, the slower link."""
  data = shape[0]
  if data % slices:
    raise ValueError(f"mesh.data={data}: the devices span {slices} slices and the data "
                     f"axis crosses them, so it must be a multiple of {slices}")
  ici = (data // slices, *shape[1:])
  try:
    from jax.experimental import mesh_utils
    return mesh_utils.create_hybrid_device_mesh(ici, (slices,) + (1,) * (len(shape) - 1),
                                                devices)
  except Exception:  # noqa: BLE001  (shapes the topology search refuses): slice-major
    by_slice: dict[int, list] = {}
    for d in sorted(devices, key=lambda d: d.id):
      by_slice.setdefault(getattr(d, "slice_index", 0), []).append(d)
    if len({len(ds) for ds in by_slice.values()}) != 1:
      raise ValueError(f"mesh: the {slices} slices hold different numbers of devices "
                       f"({', '.join(str(len(v)) for v in by_slice.values())})") from None
    parts = [np.asarray(ds, dtype=object).reshape(ici) for _, ds in sorted(by_slice.items())]
    return np.concatenate(parts, axis=0)


def _mesh_axes(rule) -> tuple[str, ...]:
  if rule is None:
    return ()
  return (rule,) if isinstance(rule, str) else tuple(rule)


def logical_to_spec(axes: Sequence[str | None], shape: Sequence[int], mesh) -> P:
  """PartitionSpec for a value with logical `axes` and `shape` on `mesh`.

  Per dimension, the rule's mesh axes are kept only while they divide the dimension
  (longest dividing prefix), size-1 axes and axes missing from the mesh are dropped, and
  no mesh axis is used twice.
  """
  if len(axes) != len(shape):
    raise ValueError(f"logical axes {tuple(axes)} do not match shape {tuple(shape)}")
  sizes = dict(mesh.shape)
  used: set[str] = set()
  spec = []
  for name, dim in zip(axes, shape):
    chosen, prod = [], 1
    for a in _mesh_axes(LOGICAL_RULES.get(name) if name else None):
      size = sizes.get(a, 1)
      if size == 1 or a in used:
        continue
      if dim % (prod * size):
        break
      chosen.append(a)
      prod *= size
    used.update(chosen)
    spec.append(None if not chosen else chosen[0] if len(chosen) == 1 else tuple(chosen))
  while spec and spec[-1] is None:
    spec.pop()
  return P(*spec)


def ambient_mesh():
  """The mesh set by `jax.set_mesh` (abstract inside jit), or None."""
  try:
    mesh = jax.sharding.get_abstract_mesh()
  except Exception:  # noqa: BLE001
    return None
  return None if mesh is None or getattr(mesh, "empty", True) else mesh


def constrain(x: jax.Array, axes: Sequence[str | None]) -> jax.Array:
  """Pin an activation's sharding by logical axes under the ambient mesh (no-op without).

  Without such pins XLA may keep activations sharded like the weights that produced
  them (e.g. on `embed` under FSDP) and all-gather the full batch each layer. Use
  ("batch", None, None) for [B, S, D] hidden states.
  """
  mesh = ambient_mesh()
  if mesh is None:
    return x
  return jax.lax.with_sharding_constraint(x, logical_to_spec(axes, x.shape, mesh))


def _logical_axes(variable) -> tuple | None:
  meta = variable.get_metadata() if hasattr(variable, "get_metadata") else {}
  for key in ("out_sharding", "sharding_names", "sharding"):
    axes = meta.get(key)
    if axes is not None:
      return tuple(axes)
  return None


def _is_variable(x) -> bool:
  from flax import nnx
  return isinstance(x, nnx.Variable)


def variable_sharding(variable, mesh: Mesh) -> NamedSharding:
  """NamedSharding of one variable (or array): its logical axes through the rules."""
  shape = getattr(variable, "shape", None)
  axes = _logical_axes(variable) if _is_variable(variable) else None
  if axes is None or shape is None or len(axes) != len(shape):
    return NamedSharding(mesh, P())
  return NamedSharding(mesh, logical_to_spec(axes, shape, mesh))


def state_shardings(state, mesh: Mesh):
  """The same tree as `state` with a NamedSharding in each leaf.

  nnx.Variables (concrete or from nnx.eval_shape) keep their wrapper, holding the
  sharding as value, so the result has exactly the state's tree structure (usable as
  jit in/out_shardings or with jax.device_put). Leaves without logical axes (step
  counters, RNG keys, plain arrays) are replicated.
  """
  def one(x):
    if _is_variable(x) and not jax.tree.leaves(x):
      return x  # holds no array (optax's MaskedNode in a partitioned optimizer's state)
    s = variable_sharding(x, mesh)
    return x.replace(s) if _is_variable(x) else s
  return jax.tree.map(one, state, is_leaf=_is_variable)


def shard_state(state, mesh: Mesh):
  """device_put every leaf of `state` onto its rule-given sharding."""
  return jax.device_put(state, state_shardings(state, mesh))


def init_sharded(create, mesh: Mesh):
  """Build `create()` (an nnx object or tuple of them) directly sharded on `mesh`.

  Returns (graphdef, state, shardings). The construction runs as one jit program whose
  outputs land on their rule-given shardings, so no host or device ever holds the whole
  model (and it is one compile instead of hundreds of eager ops).
  """
  from flax import nnx
  # No ambient mesh here: flax would read the logical names as mesh axes.
  graphdef, abstract = nnx.split(nnx.eval_shape(create))
  shardings = state_shardings(abstract, mesh)
  state = jax.jit(lambda: nnx.split(create())[1], out_shardings=shardings)()
  return graphdef, state, shardings


def batch_axes(mesh) -> tuple[str, ...]:
  """Mesh axes that split the batch (size-1 axes left out)."""
  sizes = dict(mesh.shape)
  return tuple(a for a in _mesh_axes(LOGICAL_RULES["batch"]) if sizes.get(a, 1) > 1)


def batch_sharding(mesh: Mesh, leading: int = 0, ndim: int = 2) -> NamedSharding:
  """Sharding of [*leading, batch, seq...] token arrays: batch over the batch axes.

  `leading=1` is the gradient-accumulation layout [accum, batch, seq]. The batch must
  be divisible by the product of the batch axes' sizes (`batch_divisor`).
  """
  axes = batch_axes(mesh)
  dim = None if not axes else axes[0] if len(axes) == 1 else axes
  return NamedSharding(mesh, P(*([None] * leading), dim, *([None] * (ndim - 1))))


def batch_divisor(mesh) -> int:
  """The global batch size must be a multiple of this."""
  sizes = dict(mesh.shape)
  return math.prod(sizes[a] for a in batch_axes(mesh))


def global_batch_from_host(host_batch: np.ndarray, mesh: Mesh,
                           sharding: NamedSharding | None = None) -> jax.Array:
  """One global jax.Array from each process's own slice of the batch.

  Every process passes the rows it loaded (its `1 / process_count` share along the
  batch dimension); the global shape is inferred from the sharding.
  """
  sharding = sharding or batch_sharding(mesh, ndim=np.ndim(host_batch))
  return jax.make_array_from_process_local_data(sharding, np.asarray(host_batch))


_COLLECTIVE = re.compile(
    r"= (?P<shape>.*?) (?P<kind>all-gather|all-reduce|all-to-all|reduce-scatter|"
    r"collective-permute|ragged-all-to-all)(?:-start)?\(")


def hlo_collectives(hlo_text: str) -> list[dict]:
  """The collectives of a compiled HLO module (`jit(f).lower(...).compile().as_text()`).

  Each: kind, shapes (list of int tuples: the result, or each member of a tuple
  result), dtypes (HLO names: f32, s32, ...), op_name (the JAX op it came from: "/while/body/" marks the scanned layer).
  """
  found = []
  for line in hlo_text.splitlines():
    m = _COLLECTIVE.search(line)
    if not m:
      continue
    arrays = re.findall(r"([a-z]+\d*)\[([\d,]*)\]", m["shape"])
    shapes = [tuple(int(d) for d in dims.split(",") if d) for _, dims in arrays]
    op = re.search(r'op_name="([^"]*)"', line)
    found.append({"kind": m["kind"], "shapes": shapes, "dtypes": [t for t, _ in arrays],
                  "op_name": op[1] if op else ""})
  return found
