# selfnorm training image: the stack the tests run (torch 2.14.1+cu130 and torchvision 0.29.1,
# pinned by constraints.txt) on the CUDA 13.0 toolkit that matches torch's CUDA build, the same
# set-up script as the README and CI, and the compiled op prebuilt for A100, H100/H200, B200 and
# (as PTX) later GPUs. Python is Ubuntu 24.04's 3.12.
#
#   docker build -t selfnorm --build-arg USER_UID="$(id -u)" --build-arg USER_GID="$(id -g)" .
#   mkdir -p logs    # owned by you; the container runs as the user "selfnorm" with your UID
#   docker run --rm --gpus all --ipc=host -v /data/imagenet:/data/imagenet:ro \
#       -v "$PWD/logs:/logs" -v selfnorm-cache:/var/cache/selfnorm \
#       selfnorm fit --config imagenet_sselu.yaml --trainer.default_root_dir /logs
#   docker run --rm --gpus all selfnorm selftest     # the image's smoke test on a GPU node
#
# --ipc=host gives the DDP and data-loading workers enough shared memory; the named volume keeps
# the .beton files that configs without a path write to the data cache.
ARG BASE_IMAGE=nvidia/cuda:13.0.2-devel-ubuntu24.04
FROM ${BASE_IMAGE}

SHELL ["/bin/bash", "-o", "pipefail", "-c"]
# A virtual environment: Ubuntu's own Python refuses pip installs into itself (PEP 668).
ENV SELFNORM_VENV=/opt/venv \
    VIRTUAL_ENV=/opt/venv \
    PATH=/opt/venv/bin:${PATH} \
    SELFNORM_PIP_EXTRA=--no-build-isolation \
    SELFNORM_DATA_DIR=/var/cache/selfnorm/data \
    PIP_NO_CACHE_DIR=1 \
    PYTHONUNBUFFERED=1

WORKDIR /opt/selfnorm
# Dependencies first, from only the files that decide them: a source edit keeps this layer.
COPY pyproject.toml constraints.txt ./
COPY scripts/setup.sh scripts/
RUN SELFNORM_DEPS_ONLY=1 bash scripts/setup.sh && rm -rf /var/lib/apt/lists/*

# Declared after the dependency layer, so another architecture list rebuilds only the op.
# The default is cuda_ops/build.py's DEFAULT_ARCH_LIST; +PTX keeps newer GPUs running.
ARG TORCH_CUDA_ARCH_LIST="8.0;9.0;10.0+PTX"
# SELFNORM_REQUIRE_CUDA: a GPU image must fail to build rather than ship the Python reference.
ENV TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST} \
    SELFNORM_REQUIRE_CUDA=1
COPY . .
# The project (editable) and the op; bytecode compiled now, as the user cannot write here.
RUN bash scripts/setup.sh && python -m compileall -q app models data cuda_ops

# A non-root user; give it your UID/GID so files written to bind mounts are yours. Ubuntu's
# default "ubuntu" user would hold UID 1000.
ARG USER_UID=1000
ARG USER_GID=1000
RUN if id -u ubuntu >/dev/null 2>&1; then userdel --remove ubuntu; fi \
    && { getent group "${USER_GID}" >/dev/null || groupadd --gid "${USER_GID}" selfnorm; } \
    && useradd --no-log-init --create-home --shell /bin/bash --uid "${USER_UID}" \
        --gid "${USER_GID}" selfnorm \
    && install -d -o selfnorm -g "${USER_GID}" /workspace /logs /var/cache/selfnorm
# Numeric, so a cluster's runAsNonRoot check can verify it without the image's /etc/passwd.
USER ${USER_UID}:${USER_GID}
WORKDIR /workspace
ENTRYPOINT ["python", "-m", "app"]
CMD ["--help"]
