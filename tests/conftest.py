"""Test-wide setup: eight simulated CPU devices (for sharding tests), quiet logs, and a
persistent compilation cache so identical steps compiled by several tests (and by CLI
subprocesses) are compiled once. Tests run on the CPU backend (JAX_PLATFORMS=cpu); the
GPU tests compile for GPU targets from it (tests/gpu_util.py)."""
import os
import tempfile

os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
os.environ.setdefault("JAX_COMPILATION_CACHE_DIR",
                      os.path.join(tempfile.gettempdir(), "vesperjax-test-jax-cache"))
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0.2")
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES", "0")
