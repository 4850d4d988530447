"""large: 24 x 1024 (~350M): one 80 GB GPU or a small pod."""
from vesperjax.run_config import default_run_config


def get_config():
  config = default_run_config("large")
  config.data.seq_len = 1024
  config.data.tokenizer = "bpe:32768"
  config.optim.lr = 0.0003
  config.optim.warmup_steps = 2000
  config.train.batch_size = 64
  config.train.max_steps = 50000
  config.train.eval_every = 2000
  config.train.save_every = 2000
  config.model.remat = "dots_no_batch"
  return config
