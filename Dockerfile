# The image every imgclf pipeline step runs in: the trainer library, the components and kfp.
#
#   docker build -t ghcr.io/imgclf/imgclf:0.1.0 .                                   # CPU
#   docker build --build-arg TF_VARIANT=gpu -t ghcr.io/imgclf/imgclf:0.1.0-gpu .    # NVIDIA GPUs
#
# The GPU variant takes TensorFlow's CUDA and cuDNN wheels from PyPI, so the base stays a slim
# Python image; the node needs only the NVIDIA driver (and the device plugin).
#
# Air-gapped / offline builds: put wheels in ./wheelhouse (pip download -d wheelhouse .) and pass
# --build-arg PIP_OFFLINE=1; nothing is then fetched from the network. BASE_IMAGE may be any
# Debian-like image with python3 (3.11+) and venv.
ARG BASE_IMAGE=python:3.11-slim

FROM ${BASE_IMAGE} AS build
ARG PIP_OFFLINE=0
ARG TF_VARIANT=cpu
WORKDIR /src
COPY pyproject.toml README.md ./
COPY trainer ./trainer
COPY components ./components
COPY pipelines ./pipelines
# The wheelhouse folder may be empty; a .keep file makes the COPY valid either way.
COPY wheelhouse /wheels
RUN python3 -m venv /opt/imgclf \
    && if [ "$PIP_OFFLINE" = "1" ]; then \
         /opt/imgclf/bin/pip install --no-cache-dir --no-index --find-links /wheels ".[${TF_VARIANT}]" ; \
       else \
         /opt/imgclf/bin/pip install --no-cache-dir ".[${TF_VARIANT}]" ; \
       fi

FROM ${BASE_IMAGE}
COPY --from=build /opt/imgclf /opt/imgclf
# KFP runs `python3 -m kfp.dsl.executor_main`; the virtual environment comes first on PATH.
ENV PATH=/opt/imgclf/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    TF_CPP_MIN_LOG_LEVEL=2
RUN useradd --uid 1000 --create-home --shell /usr/sbin/nologin imgclf
USER 1000
WORKDIR /home/imgclf
# `imgclf serve MODEL_URI --host 0.0.0.0` listens here (KServe's and SageMaker's container port).
EXPOSE 8080
CMD ["imgclf", "--help"]
