"""Benchmarks of whole training steps, each concept in its own module; the CLI is
`python -m vesperjax.benchmark` (vesperjax/benchmark.py).

  throughput   the trainer's jit step timed on synthetic tokens (`run_throughput`)
  optimizers   Velvet vs AdamW over a learning-rate sweep and seeds (`run_optimizers`,
               `summarize`, `format_table`)
  plots        the sweep report's figures (`plot_report`)
  yardstick    what a timing is read against: a fixed matmul's rate now
               (`matmul_gflops`), peak memory (`peak_memory`), process CPU time

The kernels' own timing harness is `vesperjax.kernels.bench`.
"""
