"""How the processes of a run find each other: the launch environment checked before any
device is touched, then `jax.distributed.initialize` when this is one process of several.

Explicit variables (JAX_COORDINATOR_ADDRESS, JAX_NUM_PROCESSES, JAX_PROCESS_ID) take
precedence; otherwise a cluster JAX detects by itself (SLURM, Open MPI, Cloud TPU) with
more than one process. docs/launch.md shows the recipes.
"""
from __future__ import annotations

import logging
import os

import jax

log = logging.getLogger(__name__)

_ENV = ("JAX_COORDINATOR_ADDRESS", "JAX_NUM_PROCESSES", "JAX_PROCESS_ID")


def _distributed_is_initialized() -> bool:
  try:
    from jax._src import distributed
    return distributed.global_state.client is not None
  except Exception:  # noqa: BLE001  (private API moved): fall back to our own flag
    return _initialized


_initialized = False


# Which cluster JAX found, by its ClusterEnv class (JAX's own names are not all set).
_CLUSTER_NAMES = {"SlurmCluster": "SLURM", "OmpiCluster": "Open MPI",
                  "GceTpuCluster": "Cloud TPU", "GkeTpuCluster": "Cloud TPU (GKE)",
                  "K8sCluster": "Kubernetes", "Mpi4pyCluster": "mpi4py"}


def _detected_cluster() -> tuple[str, int]:
  """(name, process count) of a cluster JAX auto-detects (SLURM, Open MPI, Cloud TPU,
  ...); ("", 1) when none is present: a plain machine never initializes.
  """
  try:
    from jax._src.clusters import ClusterEnv
  except Exception:  # noqa: BLE001
    return "", 1
  for env in ClusterEnv._cluster_types:  # noqa: SLF001
    try:
      if getattr(env, "opt_in_only_method", False) or not env.is_env_present():
        continue
      return _CLUSTER_NAMES.get(env.__name__, env.__name__), int(env.get_process_count())
    except Exception:  # noqa: BLE001  (half-configured: check_launch_env names it)
      continue
  return "", 1


def _int_var(env, name: str) -> int:
  try:
    return int(env[name])
  except ValueError:
    raise ValueError(f"multi-process launch: {name}={env[name]!r} is not an integer") from None


_SLURM_STEP = ("SLURM_JOB_ID", "SLURM_STEP_NODELIST", "SLURM_NTASKS", "SLURM_PROCID",
               "SLURM_LOCALID")  # what JAX's SLURM detection reads (srun sets them all)
_OMPI = ("OMPI_COMM_WORLD_SIZE", "OMPI_COMM_WORLD_RANK", "OMPI_COMM_WORLD_LOCAL_RANK")
_ONE_PROCESS = "VESPERJAX_DISTRIBUTED=0 runs one process"


def check_launch_env(env=None) -> None:
  """One-line ValueError for a launch environment JAX would misread, before any device
  is touched: explicit JAX_* variables half set or not integers; a SLURM job of several
  tasks run outside `srun` (each would train alone, or JAX would wait for tasks that
  never start), or a job step missing a variable; Open MPI variables without the
  launcher URI JAX needs."""
  env = os.environ if env is None else env
  given = [k for k in _ENV if env.get(k)]
  if given:
    if len(given) != len(_ENV):
      missing = sorted(set(_ENV) - set(given))
      raise ValueError(f"multi-process launch: {', '.join(given)} set but "
                       f"{', '.join(missing)} missing")
    n, i = _int_var(env, "JAX_NUM_PROCESSES"), _int_var(env, "JAX_PROCESS_ID")
    if not 0 <= i < n:
      raise ValueError(f"multi-process launch: JAX_PROCESS_ID={i} is not in [0, "
                       f"JAX_NUM_PROCESSES={n})")
    return  # explicit variables take precedence over any scheduler's
  if "SLURM_JOB_ID" in env:
    in_step = "SLURM_STEP_ID" in env or "SLURM_STEP_NODELIST" in env
    if in_step:
      missing = [k for k in _SLURM_STEP if k not in env]
      if missing:
        raise ValueError(f"SLURM job step without {', '.join(missing)}: JAX needs "
                         f"{', '.join(_SLURM_STEP)} (srun sets them; a container must pass "
                         f"them through), or {_ONE_PROCESS}")
      n, i = _int_var(env, "SLURM_NTASKS"), _int_var(env, "SLURM_PROCID")
      step = env.get("SLURM_STEP_NUM_TASKS")
      if step is not None and _int_var(env, "SLURM_STEP_NUM_TASKS") != n:
        raise ValueError(f"SLURM job step of {step} task(s) in a job of SLURM_NTASKS={n}: "
                         f"JAX waits for all {n}; run srun with every task of the job "
                         f"(srun --ntasks={n}), or {_ONE_PROCESS}")
      if not 0 <= i < n:
        raise ValueError(f"SLURM_PROCID={i} is not in [0, SLURM_NTASKS={n})")
    elif env.get("SLURM_NTASKS") and _int_var(env, "SLURM_NTASKS") > 1:
      raise ValueError(f"a SLURM job of SLURM_NTASKS={env['SLURM_NTASKS']} tasks, but "
                       "this is its batch script (or salloc shell), not a job step: start "
                       f"the trainer with `srun python -m vesperjax.train ...`, or "
                       f"{_ONE_PROCESS}")
  if env.get("OMPI_COMM_WORLD_SIZE") and "OMPI_MCA_orte_hnp_uri" not in env:
    if _int_var(env, "OMPI_COMM_WORLD_SIZE") > 1:
      raise ValueError(
          f"Open MPI rank of OMPI_COMM_WORLD_SIZE={env['OMPI_COMM_WORLD_SIZE']} without "
          "OMPI_MCA_orte_hnp_uri (Open MPI 5 sets none), which JAX reads for the "
          "coordinator: set JAX_COORDINATOR_ADDRESS, JAX_NUM_PROCESSES and JAX_PROCESS_ID "
          f"(= OMPI_COMM_WORLD_RANK), or {_ONE_PROCESS}")
  elif "OMPI_MCA_orte_hnp_uri" in env:
    missing = [k for k in _OMPI if k not in env]
    if missing:
      raise ValueError(f"Open MPI launch without {', '.join(missing)}: start the trainer "
                       f"with mpirun, or {_ONE_PROCESS}")


def _announce(how: str) -> str:
  """The log's line on how the processes were found (stderr, process 0, once)."""
  import sys
  global _announced
  if not _announced and jax.process_index() == 0:
    print(f"processes: {how}", file=sys.stderr, flush=True)
  _announced = True
  return how


_announced = False


def maybe_initialize_distributed() -> str:
  """Call jax.distributed.initialize when this is one process of several; idempotent.

  Explicit: JAX_COORDINATOR_ADDRESS (host:port of process 0), JAX_NUM_PROCESSES and
  JAX_PROCESS_ID (and optionally JAX_LOCAL_DEVICE_IDS="0,1"). Otherwise a cluster JAX
  detects by itself (SLURM, Open MPI, multi-host Cloud TPU) with more than one process.
  VESPERJAX_DISTRIBUTED=0 turns this off. Must run before anything touches a device.
  A half-set launch environment is a one-line ValueError (`check_launch_env`). Returns
  how the processes were found, which process 0 also writes to stderr as one
  `processes: ...` line, except for a plain single process (no scheduler, no variables:
  a command's only stderr line may then be its `error:` line).
  """
  global _initialized
  if _initialized or _distributed_is_initialized():
    return f"{jax.process_count()} (initialized before)"
  if os.environ.get("VESPERJAX_DISTRIBUTED", "").lower() in ("0", "false", "off", "no"):
    return _announce("1 (VESPERJAX_DISTRIBUTED=0: single process)")
  check_launch_env()
  if os.environ.get("JAX_COORDINATOR_ADDRESS"):
    local = os.environ.get("JAX_LOCAL_DEVICE_IDS")
    jax.distributed.initialize(
        coordinator_address=os.environ["JAX_COORDINATOR_ADDRESS"],
        num_processes=int(os.environ["JAX_NUM_PROCESSES"]),
        process_id=int(os.environ["JAX_PROCESS_ID"]),
        local_device_ids=[int(i) for i in local.split(",")] if local else None)
    how = (f"{jax.process_count()} from JAX_COORDINATOR_ADDRESS, JAX_NUM_PROCESSES and "
           f"JAX_PROCESS_ID (coordinator {os.environ['JAX_COORDINATOR_ADDRESS']})")
  else:
    name, count = _detected_cluster()
    if not name:
      return ("1 (single process: no SLURM, Open MPI or Cloud TPU environment, no "
              "JAX_COORDINATOR_ADDRESS)")
    if count <= 1:
      return _announce(f"1 (single process: a {name} job of one process)")
    jax.distributed.initialize()
    how = f"{jax.process_count()} found through {name}'s environment"
  _initialized = True
  log.info("jax.distributed: process %d of %d", jax.process_index(), jax.process_count())
  return _announce(how)
