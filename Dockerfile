# syntax=docker/dockerfile:1
#
# Two images from one file:
#   docker build --target service -t sftops-service .   the control plane: gunicorn + Flask, no torch
#   docker build --target job     -t sftops-job .       one training job: CUDA torch + the `train` extra
#
# Both run as uid 1000 and work with a read-only root filesystem: the job writes only to /cache
# (model cache) and /tmp, the plane only to /data (SQLite), /tmp and its Prometheus directory;
# the Kubernetes launcher and the Helm chart mount those.
#
# Python packages are pinned to the versions the test suite runs with (see `make install`), so an
# image built later holds what was tested. Bump them together with pyproject.toml's ranges.

ARG PYTHON_IMAGE=python:3.11.14-slim-bookworm
# torch's CUDA wheels bring their own CUDA libraries; the base supplies the matching user-space
# runtime and a recent glibc. TORCH_INDEX must name the same CUDA release (12.8 -> cu128).
ARG CUDA_IMAGE=nvidia/cuda:12.8.1-cudnn-runtime-ubuntu24.04
ARG TORCH_VERSION=2.13.0
ARG TORCH_INDEX=https://download.pytorch.org/whl/cu128

# ---------------------------------------------------------------------------------------------
# service: the control plane
# ---------------------------------------------------------------------------------------------
FROM ${PYTHON_IMAGE} AS service-build
ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PATH=/opt/venv/bin:$PATH
RUN python -m venv /opt/venv \
 && pip install pip==26.3 setuptools==84.2.1
# Dependencies first, in their own layer: a source change does not reinstall them.
RUN pip install \
      pydantic==2.14.4 pyyaml==6.0.4 boto3==1.44.8 pyarrow==26.0.1 orjson==3.13.0 requests==2.34.2 \
      flask==3.1.3 gunicorn==27.0.1 prometheus-client==0.26.0 sqlalchemy==2.1.9 alembic==1.20.1 \
      "psycopg[binary]==3.3.9" kubernetes==36.0.3
WORKDIR /app
COPY . .
# --no-deps: everything is pinned above; pip check proves the pins satisfy pyproject.toml.
RUN pip install --no-deps --no-build-isolation . && pip check

FROM ${PYTHON_IMAGE} AS service
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    SFTOPS_BIND=0.0.0.0:8000 \
    SFTOPS_DATA_DIR=/data
RUN groupadd --gid 1000 sftops \
 && useradd --uid 1000 --gid 1000 --home-dir /app --no-create-home --shell /usr/sbin/nologin sftops \
 && mkdir -p /data \
 && chown 1000:1000 /data
COPY --from=service-build /opt/venv /opt/venv
# The source stays root-owned (read-only to the app); gunicorn reads its config from it.
COPY --from=service-build /app /app
WORKDIR /app
# Numeric, so Kubernetes' runAsNonRoot can verify it.
USER 1000:1000
EXPOSE 8000
# The image ships no curl: the interpreter it already has does the probe.
HEALTHCHECK --interval=30s --timeout=5s --start-period=30s --retries=3 \
  CMD ["python", "-c", "import urllib.request; urllib.request.urlopen('http://127.0.0.1:8000/healthz', timeout=4)"]
CMD ["gunicorn", "-c", "service/gunicorn.conf.py", "service.app:create_app()"]

# ---------------------------------------------------------------------------------------------
# job: one LoRA SFT run on a GPU
# ---------------------------------------------------------------------------------------------
FROM ${CUDA_IMAGE} AS job-base
# Ubuntu 24.04's own Python 3.12 (the project needs >= 3.11).
# DL3008 (pin apt versions) is ignored here and below: the base image tag pins the distribution
# release, and exact Ubuntu package versions vanish from the archive with each security update.
# hadolint ignore=DL3008
RUN apt-get update \
 && apt-get install -y --no-install-recommends python3.12 ca-certificates \
 && rm -rf /var/lib/apt/lists/*

FROM job-base AS job-build
ARG TORCH_VERSION
ARG TORCH_INDEX
ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PATH=/opt/venv/bin:$PATH
# DL3008: see job-base; python3.12-venv only provides ensurepip for building the venv.
# hadolint ignore=DL3008
RUN apt-get update \
 && apt-get install -y --no-install-recommends python3.12-venv \
 && rm -rf /var/lib/apt/lists/*
# The CUDA build of torch from its own index, before anything that depends on torch.
RUN python3.12 -m venv /opt/venv \
 && pip install pip==26.3 setuptools==84.2.1 \
 && pip install "torch==${TORCH_VERSION}" --index-url "${TORCH_INDEX}"
RUN pip install \
      pydantic==2.14.4 pyyaml==6.0.4 boto3==1.44.8 pyarrow==26.0.1 orjson==3.13.0 requests==2.34.2 \
      transformers==5.24.0 peft==0.21.2 trl==1.16.0 datasets==5.2.0 accelerate==1.15.0 \
      gguf==0.19.0 safetensors==0.8.0 matplotlib==3.11.2
WORKDIR /app
COPY . .
RUN pip install --no-deps --no-build-isolation . && pip check

FROM job-base AS job
# Every cache lands under /cache (a volume the launcher mounts) or /tmp, never in the read-only
# root filesystem: the model cache, Hugging Face, torch, triton and matplotlib.
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    SFTOPS_MODEL_CACHE=/cache \
    HF_HOME=/cache/hf \
    TORCH_HOME=/cache/torch \
    TRITON_CACHE_DIR=/cache/triton \
    XDG_CACHE_HOME=/cache/xdg \
    MPLCONFIGDIR=/tmp/matplotlib \
    HOME=/tmp
# Ubuntu 24.04 images already have a user and group "ubuntu" with id 1000: replace them.
RUN if id -u ubuntu >/dev/null 2>&1; then userdel ubuntu && rm -rf /home/ubuntu; fi \
 && if getent group ubuntu >/dev/null; then groupdel ubuntu; fi \
 && groupadd --gid 1000 sftops \
 && useradd --uid 1000 --gid 1000 --home-dir /tmp --no-create-home --shell /usr/sbin/nologin sftops \
 && mkdir -p /cache \
 && chown 1000:1000 /cache
COPY --from=job-build /opt/venv /opt/venv
COPY --from=job-build /app /app
WORKDIR /app
USER 1000:1000
# The Kubernetes launcher sets the whole command (`python -m job run --spec ...`, or torchrun for
# several GPUs); by hand, `docker run IMAGE prepare --data ... --out ...` runs any subcommand.
ENTRYPOINT ["python", "-m", "job"]
CMD ["--help"]
