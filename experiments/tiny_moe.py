"""tiny-moe: tiny with 4 experts, top-2: CPU-sized MoE."""
from vesperjax.run_config import default_run_config


def get_config():
  config = default_run_config("tiny-moe")
  config.optim.lr = 0.001
  config.optim.warmup_steps = 30
  config.train.batch_size = 8
  config.model.scan_layers = False  # shallow: unrolled is faster on CPU (docs/benchmarks.md)
  config.train.max_steps = 300
  config.train.eval_every = 100
  config.train.save_every = 100
  config.train.log_every = 10
  return config
