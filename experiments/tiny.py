"""tiny: 6 x 256, ~3M non-embedding params: CPU quick start (a few minutes)."""
from vesperjax.run_config import default_run_config


def get_config():
  config = default_run_config("tiny")
  config.optim.lr = 0.001
  config.optim.warmup_steps = 30
  config.train.batch_size = 8
  config.model.scan_layers = False  # shallow: unrolled is faster on CPU (docs/benchmarks.md)
  config.train.max_steps = 150
  config.train.eval_every = 50
  config.train.save_every = 50
  config.train.log_every = 10
  return config
