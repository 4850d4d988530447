"""An experiment file whose get_config() raises (the CLI must say so in one line)."""


def get_config():
  raise RuntimeError("this config file is broken on purpose")
