"""Benchmarks of whole training steps, each concept in its own module; the CLI is
`python -m vesperjax.benchmark` (vesperjax/benchmark.py).

  throughput   the trainer's jit step timed on synthetic tokens (`run_throughput`)
  optimizers   Velvet, AdamW and the field over a learning-rate sweep and seeds, the
               study protocol (`run_optimizers`, `summarize`)
  tables       the sweep's terminal and markdown tables (`format_table`, `markdown_table`)
  plots        the sweep report's figures (`plot_report`)
  yardstick    what a timing is read against: a fixed matmul's rate now
               (`matmul_gflops`), peak memory (`peak_memory`), process CPU time

The kernels' own timing harness is `vesperjax.kernels.bench`.
"""
