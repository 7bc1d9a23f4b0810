# syntax=docker/dockerfile:1
# Serving image of the chapter "Model Deployment Basics" (section 5.4).
#   make artifacts                                    # writes artifacts/serve/ (model + checksum)
#   docker build -t ml-server:0.1.0 .                 # ONNX Runtime image, no torch
#   docker build --target runtime-torchscript -t ml-server:0.1.0-torch .
# tests/test_docker_contract.py checks this file without a Docker engine.

# One exact base for every stage: the same Python in the builder and at run time.
ARG PYTHON_IMAGE=python:3.11.14-slim-bookworm

# --- base: settings and the unprivileged user shared by the runtime stages --------------------
FROM ${PYTHON_IMAGE} AS base
ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PATH=/opt/venv/bin:$PATH \
    PYTHONPATH=/app
RUN groupadd --gid 10001 app \
 && useradd --uid 10001 --gid app --no-create-home --home-dir /nonexistent --shell /usr/sbin/nologin app
WORKDIR /app

# --- builder: install the pinned serving dependencies into a virtual environment ---------------
FROM base AS builder
RUN python -m venv /opt/venv
COPY requirements-serve.txt /tmp/requirements-serve.txt
# Behind a proxy that re-signs HTTPS, pass its CA bundle as a build secret (never stored in a layer):
#   docker build --secret id=pip-ca,src=/etc/ssl/certs/ca-certificates.crt .
RUN --mount=type=secret,id=pip-ca \
    if [ -s /run/secrets/pip-ca ]; then export PIP_CERT=/run/secrets/pip-ca; fi \
 && pip install --no-cache-dir --requirement /tmp/requirements-serve.txt

# --- builder-torch: the same plus the CPU build of torch, for the TorchScript variant -----------
FROM builder AS builder-torch
ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu
COPY requirements-serve-torch.txt /tmp/requirements-serve-torch.txt
RUN --mount=type=secret,id=pip-ca \
    if [ -s /run/secrets/pip-ca ]; then export PIP_CERT=/run/secrets/pip-ca; fi \
 && pip install --no-cache-dir --extra-index-url "${TORCH_INDEX_URL}" --requirement /tmp/requirements-serve-torch.txt

# --- runtime-torchscript: the draft's TorchScript service (build with --target) ----------------
FROM base AS runtime-torchscript
COPY --from=builder-torch /opt/venv /opt/venv
COPY code/mldeploy/ /app/mldeploy/
WORKDIR /app/model
COPY artifacts/serve/model_ts_script.pt artifacts/serve/model_ts_script.pt.sha256 ./
RUN sha256sum --check --strict model_ts_script.pt.sha256
WORKDIR /app
ENV MLDEPLOY_BACKEND=torchscript \
    MLDEPLOY_MODEL=/app/model/model_ts_script.pt \
    MLDEPLOY_HOST=0.0.0.0 \
    MLDEPLOY_PORT=8888 \
    MLDEPLOY_ADMIN_PORT=8081
USER 10001:10001
EXPOSE 8888 8081
HEALTHCHECK --interval=30s --timeout=5s --start-period=20s --retries=3 CMD ["python", "-m", "mldeploy.serving.healthcheck"]
CMD ["python", "-m", "mldeploy.serving"]

# --- runtime (default target): ONNX Runtime only ----------------------------------------------
FROM base AS runtime
COPY --from=builder /opt/venv /opt/venv
COPY code/mldeploy/ /app/mldeploy/
WORKDIR /app/model
COPY artifacts/serve/model.onnx artifacts/serve/model.onnx.sha256 ./
RUN sha256sum --check --strict model.onnx.sha256
WORKDIR /app
ENV MLDEPLOY_BACKEND=onnx \
    MLDEPLOY_MODEL=/app/model/model.onnx \
    MLDEPLOY_HOST=0.0.0.0 \
    MLDEPLOY_PORT=8888 \
    MLDEPLOY_ADMIN_PORT=8081
USER 10001:10001
EXPOSE 8888 8081
HEALTHCHECK --interval=30s --timeout=5s --start-period=10s --retries=3 CMD ["python", "-m", "mldeploy.serving.healthcheck"]
CMD ["python", "-m", "mldeploy.serving"]
