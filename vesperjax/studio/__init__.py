"""Vesper Studio: a local web app to launch, watch, compare and chat with runs.

`python -m vesperjax.studio --runs runs/` serves it on http://127.0.0.1:8765 (guide:
docs/studio.md). Modules: `paths` (confining names to --runs and the data roots),
`safe_files` (reading and writing inside folders others may write to), `runs` (reading
run directories), `forms` (checking a new-run or benchmark form), `jobs` (training and
benchmark child processes), `job_config` (the config file every job names), `procs`
(which process is a run's), `chat` (a loaded model streaming tokens), `app` (the ASGI
app), `__main__` (the CLI). Files in --runs and --data-root are data, never
instructions (docs/studio.md's threat model).
The front end is static files (`static/`) with uPlot vendored: nothing is fetched from
the network. Needs the `studio` extra (starlette, uvicorn).
"""
