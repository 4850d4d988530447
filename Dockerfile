# vesperjax for NVIDIA GPUs (the default) or Cloud TPU: `python -m vesperjax.train` as
# the entry point.
#
#   docker build -t vesperjax .
#   docker build -t vesperjax-tpu --build-arg BASE_IMAGE=ubuntu:24.04 --build-arg EXTRA=tpu .
#   docker run --gpus all --shm-size=16g -v "$PWD/runs:/app/runs" vesperjax \
#       --config experiments/small.py --workdir runs/small
#
# Not built or run in this repository's CI (no container engine there): hadolint lints it
# (tests/test_launch_recipes.py). jax[cuda12] brings its own CUDA and cuDNN wheels, so
# the base image supplies the system libraries and the driver hook-up, not the toolkit.
ARG BASE_IMAGE=nvidia/cuda:12.8.1-runtime-ubuntu24.04
FROM ${BASE_IMAGE}
ARG EXTRA=gpu

ENV DEBIAN_FRONTEND=noninteractive \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

# Ubuntu's Python 3.12 (vesperjax needs >= 3.11), unpinned: the release's own; a venv,
# since the system Python is externally managed (PEP 668)
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends python3 python3-venv \
    && rm -rf /var/lib/apt/lists/*
RUN python3 -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH

WORKDIR /app
# the package's own files first: a change to experiments/ or the docs keeps this layer
COPY pyproject.toml README.md ./
COPY vesperjax vesperjax
COPY kernels kernels
# the package itself is not pinned: its dependencies' bounds are pyproject.toml's
# hadolint ignore=DL3013
RUN pip install ".[${EXTRA}]"
# the experiment configs, which --config names by path
COPY experiments experiments

# checkpoints, data caches and logs: mount a volume here (or pass another --workdir)
VOLUME ["/app/runs"]
ENTRYPOINT ["python", "-m", "vesperjax.train"]
CMD ["--help"]
