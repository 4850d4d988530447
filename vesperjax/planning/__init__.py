"""Planning GPU runs on a CPU host: the compiled program (`program`), the batch and
token searches (`search`), and the target cards (`gpu_targets`)."""
