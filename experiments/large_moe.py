"""large-moe: large with 16 experts, top-2: expert + FSDP parallel on a pod."""
from vesperjax.run_config import default_run_config


def get_config():
  config = default_run_config("large-moe")
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
