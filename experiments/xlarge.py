"""xlarge: 24 x 2048 (~1B): multi-GPU / TPU, FSDP over every device."""
from vesperjax.run_config import default_run_config


def get_config():
  config = default_run_config("xlarge")
  config.data.seq_len = 2048
  config.data.tokenizer = "bpe:32768"
  config.optim.lr = 0.0002
  config.optim.warmup_steps = 2000
  config.train.batch_size = 128
  config.train.grad_accum = 1
  config.train.max_steps = 100000
  config.train.eval_every = 2000
  config.train.save_every = 2000
  config.model.remat = "dots_no_batch"
  config.mesh.data = 1
  config.mesh.fsdp = -1
  return config
