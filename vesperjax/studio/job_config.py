"""The config file every studio job names: `--config .../job_config.py:CONFIG`, where
CONFIG is the run's config as JSON (what the studio checked, carried in the command line)
or the path of a JSON file holding one (from a shell: a run's `studio_config.json` or
`config.json`). It lives in the package, so a job never executes Python read from its
run folder, which others may write into."""
import json

from vesperjax.run_config import RunConfig


def get_config(spec: str):
  if spec.lstrip().startswith("{"):
    return RunConfig.from_dict(json.loads(spec)).to_config_dict()
  with open(spec) as f:  # an older config.json may hold keys the schema has dropped
    return RunConfig.from_dict(json.load(f), ignore_unknown=True).to_config_dict()
