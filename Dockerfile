# selfnorm training image: CUDA devel base (nvcc for the op), the same set-up script as the
# README and CI, the compiled op prebuilt for the target GPUs.
#   docker build -t selfnorm .
#   docker run --gpus all --ipc=host -v /data:/data -v $PWD/logs:/logs selfnorm \
#       fit --config imagenet_sselu.yaml --trainer.default_root_dir /logs
ARG BASE_IMAGE=pytorch/pytorch:2.9.1-cuda12.8-cudnn9-devel
FROM ${BASE_IMAGE}

# A100 (8.0) and H100/H200 (9.0); override with --build-arg TORCH_CUDA_ARCH_LIST=...
ARG TORCH_CUDA_ARCH_LIST="8.0;9.0"
ENV TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST} \
    DEBIAN_FRONTEND=noninteractive \
    PIP_NO_CACHE_DIR=1 \
    SELFNORM_VENV=system \
    SELFNORM_NO_CONSTRAINTS=1 \
    SELFNORM_PIP_EXTRA=--no-build-isolation \
    SELFNORM_REQUIRE_CUDA=1 \
    PYTHONUNBUFFERED=1

WORKDIR /opt/selfnorm
COPY . /opt/selfnorm
# Installs the apt packages, the project (editable, against the image's own torch) and builds
# cuda_ops ahead of time: one script, exercised by CI on every change.
RUN bash scripts/setup.sh && rm -rf /var/lib/apt/lists/*

WORKDIR /workspace
ENTRYPOINT ["python", "-m", "app"]
CMD ["--help"]
