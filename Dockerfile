# wanrt: one image for `wanrt serve`, `wanrt worker` and `wanrt build`.
# Build:  docker build -t wanrt .
# Run:    docker run --gpus all -p 8189:8189 -v wanrt-data:/data -v /models:/models:ro wanrt serve --model /models/Wan2.2-I2V-A14B-Diffusers

ARG CUDA_IMAGE=nvidia/cuda:12.8.1-cudnn-runtime-ubuntu24.04

# ---- build stage: a wheel of wanrt and every dependency, in a virtual environment
FROM ${CUDA_IMAGE} AS build
ARG TORCH_INDEX=https://download.pytorch.org/whl/cu128
ARG TORCH_VERSION=2.11.0
ARG TENSORRT_VERSION=10.13.3.9
RUN apt-get update \
 && apt-get install -y --no-install-recommends python3 python3-venv python3-pip \
 && rm -rf /var/lib/apt/lists/*
RUN python3 -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH
WORKDIR /src
COPY pyproject.toml README.md ./
COPY src ./src
# CUDA torch from PyTorch's index, then wanrt with the GPU extras (ONNX export, TensorRT build tooling).
# tensorrt-cu12, not `tensorrt`: that one now resolves to the CUDA 13 build (driver >= 580, and a placeholder
# nvidia-cuda-runtime-cu13 that fails to install: NVIDIA/TensorRT#4614), beside a cu128 torch.
# DL3013: "." is this repository; its dependencies' ranges live in pyproject.toml.
# hadolint ignore=DL3013
RUN pip install --no-cache-dir --index-url "${TORCH_INDEX}" "torch==${TORCH_VERSION}" \
 && pip install --no-cache-dir "tensorrt-cu12==${TENSORRT_VERSION}" \
 && pip install --no-cache-dir ".[gpu]"

# ---- runtime stage: the venv, a non-root user, volumes for models, artifacts and job data
FROM ${CUDA_IMAGE} AS runtime
# gcc, libc headers and Python.h: torch.compile's Triton builds small C helpers at run time (--backend compiled)
RUN apt-get update \
 && apt-get install -y --no-install-recommends python3 python3-dev gcc libc6-dev curl \
 && rm -rf /var/lib/apt/lists/* \
 && useradd --create-home --uid 10001 wanrt \
 && mkdir -p /data /models /artifacts \
 && chown wanrt:wanrt /data /artifacts
COPY --from=build /opt/venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH \
    WANRT_DATA_DIR=/data \
    WANRT_HOST=0.0.0.0 \
    WANRT_PORT=8189 \
    PYTHONUNBUFFERED=1
USER 10001
WORKDIR /home/wanrt
VOLUME ["/data", "/models", "/artifacts"]
EXPOSE 8189
# The API's port as configured (workers serve no HTTP: compose turns this off for them)
HEALTHCHECK --interval=30s --timeout=5s --start-period=120s --retries=3 \
  CMD ["sh", "-c", "curl -fsS http://127.0.0.1:${WANRT_PORT:-8189}/ || exit 1"]
ENTRYPOINT ["wanrt"]
CMD ["serve"]
