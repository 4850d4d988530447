"""medium: 12 x 768 (~100M with a 32k vocab): one GPU."""
from vesperjax.run_config import default_run_config


def get_config():
  config = default_run_config("medium")
  config.data.seq_len = 1024
  config.data.tokenizer = "bpe:32768"
  config.optim.lr = 0.0004
  config.optim.warmup_steps = 1000
  config.train.batch_size = 32
  config.train.max_steps = 20000
  config.train.eval_every = 1000
  config.train.save_every = 2000
  return config
