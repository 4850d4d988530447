"""Training: a run's setup (`build`), the step (`train_step`), the loop (`trainer`) and
its periodic actions, checkpoints' lock and divergence guard, tracking sinks."""
