"""small: 8 x 512: a laptop GPU or a patient CPU."""
from vesperjax.run_config import default_run_config


def get_config():
  config = default_run_config("small")
  config.optim.lr = 0.0006
  config.optim.warmup_steps = 200
  config.train.batch_size = 16
  config.train.max_steps = 5000
  config.train.eval_every = 500
  config.train.save_every = 1000
  return config
