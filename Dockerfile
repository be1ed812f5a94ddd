# The logitfuse server; by default on the embedded miniature models (configs/default.yaml, models/).
#
#   docker build -t logitfuse .
#   docker run --rm -p 8000:8000 logitfuse
#
# CUDA: the same file with a CUDA build of torch (run it with `--gpus all`; models load in bf16 on CUDA):
#   docker build -t logitfuse:cuda --build-arg TORCH_INDEX=https://download.pytorch.org/whl/cu126 .
# Your own models and registry: see compose.yaml.
ARG BASE=python:3.11-slim
FROM ${BASE}

# Where torch comes from: PyTorch's CPU wheels by default (PyPI's Linux wheel pulls in CUDA libraries).
ARG TORCH_INDEX=https://download.pytorch.org/whl/cpu
ARG TORCH_VERSION=2.13.0

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    VIRTUAL_ENV=/opt/venv \
    PATH=/opt/venv/bin:$PATH

RUN python3 -m venv /opt/venv \
    && pip install --index-url "${TORCH_INDEX}" --extra-index-url https://pypi.org/simple "torch==${TORCH_VERSION}"

WORKDIR /app
# The package before the models and configs, so that editing a config does not reinstall it.
COPY pyproject.toml README.md ./
COPY logitfuse logitfuse
# The project itself pins its dependencies in pyproject.toml.
# hadolint ignore=DL3013
RUN pip install ".[serve]" \
    && useradd --create-home --uid 1000 logitfuse \
    && install -d -o logitfuse -g logitfuse /home/logitfuse/.cache
COPY configs configs
COPY models models

USER 1000
# Inside a container the server must listen on every interface for `-p 8000:8000` to reach it.
ENV LOGITFUSE_CONFIG=/app/configs/default.yaml \
    LOGITFUSE_HOST=0.0.0.0 \
    LOGITFUSE_PORT=8000
EXPOSE 8000
HEALTHCHECK --interval=30s --timeout=5s --start-period=60s \
    CMD ["python", "-c", "import urllib.request; urllib.request.urlopen('http://127.0.0.1:8000/health', timeout=4)"]
CMD ["logitfuse", "serve"]
