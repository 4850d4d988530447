"""Vesper Studio: a local web app to launch, watch, compare and chat with runs.

`python -m vesperjax.studio --runs runs/` serves it on http://127.0.0.1:8765 (guide:
docs/studio.md). Modules: `paths` (confining names to --runs and the data roots),
`runs` (reading run directories), `jobs` (training and benchmark child processes),
`chat` (a loaded model streaming tokens), `app` (the ASGI app), `__main__` (the CLI).
The front end is static files (`static/`) with uPlot vendored: nothing is fetched from
the network. Needs the `studio` extra (starlette, uvicorn).
"""
